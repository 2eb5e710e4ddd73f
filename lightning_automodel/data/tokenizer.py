"""A byte-level tokenizer: fully offline, no files, 256 byte ids after three special ids."""

from __future__ import annotations


class ByteTokenizer:
    """UTF-8 bytes shifted by the special ids: ``pad=0``, ``bos=1``, ``eos=2``, byte ``b`` -> ``b + 3``."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    offset = 3

    @property
    def vocab_size(self) -> int:
        return 256 + self.offset

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")
