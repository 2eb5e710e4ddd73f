"""Local text files -> token windows -> padded or packed batches. Offline by construction."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader, Dataset

from lightning_automodel.core.hf_weight_files import open_regular
from lightning_automodel.data.collators import PackedSequenceCollator, PaddingCollator
from lightning_automodel.data.tokenizer import ByteTokenizer
from lightning_automodel.core.logs import rank_zero_logger

log = rank_zero_logger(__name__)  # every rank prepares the same data: rank 0 says so


class DataError(ValueError):
    """Bad training data or data settings (the CLI prints it as one line, exit code 2)."""


#: Bytes read from a data file at a time.
READ_CHUNK_BYTES = 1 << 20
#: Characters of one document tokenized at a time: a longer paragraph (a 100 MB file on one line) is
#: cut into pieces of this size, at a space where there is one, so no whole-file line is ever held.
MAX_PIECE_CHARS = 1 << 18


def _decoded_chunks(path: Path) -> Iterator[str]:
    """The file as UTF-8 text in chunks of about ``READ_CHUNK_BYTES``; a bad byte is a DataError with its offset and line."""
    offset, lines, carry = 0, 0, b""
    with open_regular(path) as f:
        while True:
            raw = f.read(READ_CHUNK_BYTES)
            data, at_end = carry + raw, not raw
            try:
                text, carry = data.decode("utf-8"), b""
            except UnicodeDecodeError as exc:
                if not at_end and exc.reason == "unexpected end of data" and exc.start >= len(data) - 3:
                    text, carry = data[: exc.start].decode("utf-8"), data[exc.start :]  # a character split by the chunk
                else:
                    line = lines + data.count(b"\n", 0, exc.start) + 1
                    raise DataError(
                        f"Data file {str(path)!r} is not valid UTF-8: byte offset {offset + exc.start} (line {line}): "
                        f"{exc.reason} (byte 0x{data[exc.start]:02x}). Re-encode it as UTF-8."
                    ) from None
            if text:
                yield text
            if at_end:
                return
            consumed = len(data) - len(carry)
            offset += consumed
            lines += data.count(b"\n", 0, consumed)


def _pieces(text: str) -> Iterator[str]:
    """``text`` in pieces of at most ``MAX_PIECE_CHARS``, cut after a space where one is near the limit."""
    while len(text) > MAX_PIECE_CHARS:
        cut = text.rfind(" ", MAX_PIECE_CHARS // 2, MAX_PIECE_CHARS) + 1 or MAX_PIECE_CHARS
        yield text[:cut]
        text = text[cut:]
    yield text


def _paragraphs(path: Path) -> Iterator[str]:
    """Paragraphs (separated by blank lines) of a ``.txt`` file, streamed; long ones in pieces (:func:`_pieces`)."""
    pending = ""
    for chunk in _decoded_chunks(path):
        pending += chunk
        *complete, pending = pending.split("\n\n")
        for paragraph in complete:
            yield from _pieces(paragraph)
        if len(pending) > MAX_PIECE_CHARS:  # one paragraph longer than a piece: hand out all but the tail
            *head, pending = list(_pieces(pending))
            yield from head
    yield from _pieces(pending)


def _lines(path: Path) -> Iterator[str]:
    """Lines of a ``.jsonl`` file, streamed (a JSON record has to be read whole to be parsed)."""
    pending = ""
    for chunk in _decoded_chunks(path):
        *complete, pending = (pending + chunk).split("\n")
        yield from complete
    yield pending


def shipped_corpus() -> list[str]:
    """Paths of the small corpus that ships with the package (the embedded default trains on it)."""
    root = resources.files("lightning_automodel.data") / "corpus"
    return sorted(str(p) for p in root.iterdir() if p.name.endswith((".txt", ".jsonl")))


def read_documents(files: list[str]) -> list[str]:
    """``.txt`` files split into paragraphs (blank lines); ``.jsonl`` files with a ``text`` field."""
    docs: list[str] = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            if path.exists():  # a FIFO or a device never ends (or blocks); a directory is not a file
                raise DataError(f"Data file {name!r} is not a regular file; pass .txt or .jsonl files.")
            raise FileNotFoundError(f"Data file {name!r} does not exist.")
        if path.suffix == ".jsonl":
            for lineno, line in enumerate(_lines(path), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not a JSON line ({exc}).") from None
                except RecursionError:
                    raise DataError(f"{path}:{lineno}: the JSON line is nested too deeply to be a record.") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f"{path}:{lineno}: each JSON line needs a string field 'text'.")
                docs.extend(_pieces(record["text"]))
        elif path.suffix == ".txt":
            docs.extend(p.strip() for p in _paragraphs(path) if p.strip())
        else:
            raise DataError(f"Data file {name!r}: only .txt and .jsonl are supported.")
    return docs


class TokenWindows(Dataset):
    """Token windows of at most ``seq_length`` ids, cut from tokenized documents.

    The ids live in one flat array (2 bytes an id for vocabularies under 65,536, else 4) with each
    window's bounds: a Python list holds 8 bytes a reference per id, and a slice per window doubled it.
    """

    def __init__(self, docs: Iterable[list[int]], seq_length: int) -> None:
        self.docs: list[np.ndarray] = []
        windows: list[np.ndarray] = []  # per document: rows of (document, start, end)
        self.n_tokens = 0
        for doc in docs:
            ids = np.asarray(doc, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= 2**31):
                raise DataError(f"token ids must be in [0, 2^31); the tokenizer produced {int(ids.min())}..{int(ids.max())}.")
            starts = np.arange(0, ids.size, seq_length, dtype=np.int64)
            starts = starts[ids.size - starts >= 2]  # a window of one id has nothing to predict
            rows = np.stack([np.full_like(starts, len(self.docs)), starts, np.minimum(starts + seq_length, ids.size)], axis=1)
            windows.append(rows)
            self.docs.append(ids.astype(np.uint16 if ids.size == 0 or ids.max() < 2**16 else np.int32))
            self.n_tokens += ids.size
        self.bounds = np.concatenate(windows) if windows else np.zeros((0, 3), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, i: int) -> list[int]:
        doc, start, end = self.bounds[i]
        return self.docs[doc][start:end].tolist()


def load_tokenizer(tokenizer_path: str | None) -> Any:
    if tokenizer_path is None:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    if not Path(tokenizer_path).is_dir():
        raise FileNotFoundError(
            f"Tokenizer directory {tokenizer_path!r} does not exist (we run offline: pass a local directory)."
        )
    return AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)


class TextDataModule(pl.LightningDataModule):
    """Causal-LM batches from local ``.txt`` / ``.jsonl`` files.

    Args:
        train_files: text files (default: the small corpus shipped with the package).
        val_files: validation files (default: a ``val_fraction`` split of the training documents).
        test_files: test files (default: a ``test_fraction`` split, disjoint from training and validation).
        tokenizer_path: a local Hugging Face tokenizer directory (default: a byte-level tokenizer).
        seq_length: tokens per window.
        batch_size: windows per batch (packed into one row with ``packing``).
        packing: pack each batch into one THD row instead of padding.
        pad_to_multiple_of: with packing, pad each sequence to a multiple of this.
        num_workers: DataLoader workers.
        val_fraction: share of documents held out for validation when ``val_files`` is not given, in
            (0, 1) (no validation at all: ``trainer.limit_val_batches: 0``).
        test_fraction: share of documents held out for ``test`` when ``test_files`` is not given, in
            [0, 1) (0: no test split). Held out after the validation split, by the same seeded shuffle.
        seed: split and shuffle seed.
    """

    def __init__(
        self,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        tokenizer_path: str | None = None,
        seq_length: int = 128,
        batch_size: int = 4,
        packing: bool = False,
        pad_to_multiple_of: int = 1,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        test_files: list[str] | None = None,
        test_fraction: float = 0.05,
    ) -> None:
        super().__init__()
        if seq_length < 2:
            raise DataError(f"seq_length must be at least 2; got {seq_length}.")
        if isinstance(batch_size, bool) or batch_size < 1:
            raise DataError(f"batch_size must be at least 1; got {batch_size}.")
        if isinstance(pad_to_multiple_of, bool) or pad_to_multiple_of < 1:  # the collator would refuse it mid-run
            raise DataError(f"pad_to_multiple_of must be at least 1 (1: no padding); got {pad_to_multiple_of}.")
        if not 0 < val_fraction < 1:  # also NaN
            raise DataError(
                f"val_fraction must be in (0, 1) (the share of documents held out for validation; for no validation "
                f"set trainer.limit_val_batches: 0); got {val_fraction}."
            )
        if not 0 <= test_fraction < 1 or not 0 < val_fraction + test_fraction < 1:
            raise DataError(
                f"test_fraction must be in [0, 1) and val_fraction + test_fraction below 1 (the share of documents "
                f"held out for test; 0: none); got test_fraction={test_fraction}, val_fraction={val_fraction}."
            )
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.train_dataset: TokenWindows | None = None
        self.val_dataset: TokenWindows | None = None
        self.test_dataset: TokenWindows | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def check_model(self, vocab_size: int, max_positions: int) -> None:
        """Fail before training when the tokenizer or the sequence length cannot fit the model."""
        if self.vocab_size > vocab_size:
            raise ValueError(
                f"The tokenizer has {self.vocab_size} ids but the model's vocabulary has {vocab_size}: token ids would "
                "index past the embedding. Use the model's own tokenizer or a model with a larger vocab_size."
            )
        if max_positions and self.hparams.seq_length > max_positions:
            raise ValueError(
                f"seq_length={self.hparams.seq_length} is above the model's max_position_embeddings={max_positions}; "
                "lower data.seq_length."
            )

    def _tokenize(self, docs: list[str]) -> Iterator[list[int]]:
        """Token ids of each document, one at a time (TokenWindows keeps them compact)."""
        if isinstance(self.tokenizer, ByteTokenizer):
            yield from (self.tokenizer.encode(d) for d in docs)
            return
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        for d in docs:
            ids = self.tokenizer.encode(d, add_special_tokens=False)
            yield ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        hp = self.hparams
        docs = read_documents(hp.train_files or shipped_corpus())
        if not docs:
            raise DataError(f"The training files {hp.train_files or shipped_corpus()} contain no text.")
        # One seeded shuffle, then whole documents held out: validation first, then test.
        random.Random(hp.seed).shuffle(docs)
        total = len(docs)
        val_docs, docs = (read_documents(hp.val_files), docs) if hp.val_files else self._hold_out(docs, hp.val_fraction, total)
        test_docs, docs = (read_documents(hp.test_files), docs) if hp.test_files else self._hold_out(docs, hp.test_fraction, total)
        self.train_dataset = TokenWindows(self._tokenize(docs), hp.seq_length)
        self.val_dataset = TokenWindows(self._tokenize(val_docs), hp.seq_length)
        self.test_dataset = TokenWindows(self._tokenize(test_docs), hp.seq_length)
        for files, dataset, split in ((hp.val_files, self.val_dataset, "validation"), (hp.test_files, self.test_dataset, "test")):
            if files and not len(dataset):  # named files that give nothing: no silent run without the split
                raise DataError(f"The {split} files {files} give no window of at least 2 tokens (empty files?); add text or drop them.")
        self._check_batches(len(docs), self.train_dataset.n_tokens, len(val_docs))
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is not None and hasattr(model, "vocab_size"):
            self.check_model(model.vocab_size, model.max_positions)

    @staticmethod
    def _hold_out(docs: list[str], fraction: float, total: int) -> tuple[list[str], list[str]]:
        """``(held_out, rest)``: ``fraction`` of ``total`` documents, at least one when there is a fraction to hold
        and more than one document left."""
        n = max(1, int(total * fraction)) if len(docs) > 1 and fraction > 0 else 0
        return docs[:n], docs[n:]

    def _check_batches(self, n_docs: int, n_tokens: int, n_val_docs: int) -> None:
        """Fail before training when the training split cannot fill one batch (drop_last: no batch at all)."""
        hp = self.hparams
        world = self.trainer.world_size if self.trainer is not None else 1
        windows = len(self.train_dataset)
        per_rank = -(-windows // world)  # DistributedSampler pads every rank to the same count
        if windows and per_rank >= hp.batch_size:
            return
        held_out = f", {n_val_docs} held out for validation" if not hp.val_files and n_val_docs else ""
        ranks = f" over {world} ranks ({per_rank} per rank)" if world > 1 else ""
        what = (
            f"The training data ({n_docs} documents{held_out}, {n_tokens} tokens) gives {windows} windows of "
            f"2 to {hp.seq_length} tokens{ranks}"
        )
        if windows == 0:
            raise DataError(f"{what}: no training batch (every document is shorter than 2 tokens). Add data.")
        raise DataError(
            f"{what}, fewer than batch_size={hp.batch_size}: no full training batch. "
            f"Lower data.batch_size to at most {per_rank} or add data."
        )

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        hp, pad = self.hparams, getattr(self.tokenizer, "pad_token_id", 0) or 0
        collate = PackedSequenceCollator(hp.pad_to_multiple_of, pad_token_id=pad) if hp.packing else PaddingCollator(pad)
        return DataLoader(dataset, hp.batch_size, shuffle=shuffle, collate_fn=collate, num_workers=hp.num_workers, drop_last=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False) if len(self.val_dataset) else []

    def test_dataloader(self) -> DataLoader:
        if not len(self.test_dataset):
            raise DataError(
                "There is no test split: set data.test_fraction (a share of the training documents, e.g. 0.05) "
                "or data.test_files."
            )
        return self._loader(self.test_dataset, shuffle=False)
