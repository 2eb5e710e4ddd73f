"""Tokenizers: the one loader and the offline byte tokenizer (the embedded demo's fallback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_automodel.core.hub_writer import TOKENIZER_FILES
from lightning_automodel.data.formats import DataError


class ByteTokenizer:
    """UTF-8 bytes shifted by the special ids: ``pad=0``, ``bos=1``, ``eos=2``, byte ``b`` -> ``b + 3``. No files."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    offset = 3
    chat_template = None
    name_or_path = "byte tokenizer"
    vocab_size = 256 + offset

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")


def has_tokenizer(directory: str) -> bool:
    """Whether a checkpoint directory holds tokenizer files (a model saved alone has none)."""
    return any((Path(directory) / n).is_file() for n in TOKENIZER_FILES if n.startswith(("tokenizer", "vocab")))


def load_tokenizer(path: str | None, chat_template: str | None = None) -> Any:
    """A local Hugging Face tokenizer directory (offline), or the byte tokenizer when ``path`` is None."""
    if path is None:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    if not Path(path).is_dir():
        raise DataError(f"Tokenizer directory {path!r} does not exist (we run offline: pass a local directory).")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise DataError(f"Could not load a tokenizer from {path!r}: {' '.join(str(exc).split())}") from None
    if chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of the loss either way
    return tokenizer
