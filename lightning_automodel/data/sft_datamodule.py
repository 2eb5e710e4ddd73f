"""Supervised fine-tuning data on Hugging Face ``datasets``: memory-mapped Arrow, tokenized once, packed, resumable.

Data lives in memory-mapped Arrow tables on disk (a rank's memory does not grow with the corpus).
Tokenization and packing are ``datasets.map`` passes cached by fingerprint (source, tokenizer, settings),
so a restart reads the cache. The training loader is a ``StatefulDataLoader`` over a seeded
``DistributedSampler``: a mid-epoch resume continues with the next batch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lightning_automodel.core.packing import pack_thd, plan_rows
from lightning_automodel.data.formats import CUT, DROPPED, IGNORE, Columns, FormatName, SampleTokenizer
from lightning_automodel.data.formats import check_chat_template, resolve_format
from lightning_automodel.data.text_datamodule import DataError
from lightning_automodel.core.logs import rank_zero_logger

log = rank_zero_logger(__name__)  # every rank prepares the same data: rank 0 says so

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _builder_for(files: list[str]) -> str:
    builders = set()
    for name in files:
        suffix = Path(name).suffix.lower()
        if suffix not in _BUILDERS:
            raise DataError(
                f"Data file {name!r}: unsupported type {suffix or '(none)'}; use .jsonl, .json, .parquet, .csv, .arrow "
                "or a directory written by Dataset.save_to_disk."
            )
        builders.add(_BUILDERS[suffix])
    if len(builders) > 1:
        raise DataError(f"Data files {files} mix formats ({sorted(builders)}); give files of one type per split.")
    return builders.pop()


def load_raw_dataset(files: str | list[str], split: str = "train", cache_dir: str | None = None) -> Any:
    """A ``datasets.Dataset`` from local files, a ``save_to_disk`` directory or (online) a hub dataset name."""
    import datasets

    names = [files] if isinstance(files, str) else list(files)
    if not names:
        raise DataError("data.train_files is empty: give data files, a saved dataset directory or a hub dataset name.")
    local = [Path(n) for n in names]
    try:
        if len(local) == 1 and local[0].is_dir():
            loaded = datasets.load_from_disk(str(local[0]))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if all(p.is_file() for p in local):
            return datasets.load_dataset(_builder_for(names), data_files=names, split="train", cache_dir=cache_dir)
        missing = [n for n, p in zip(names, local) if not p.exists()]
        if len(names) == 1 and not Path(names[0]).suffix and "/" in names[0] and not names[0].startswith(("/", ".")):
            return datasets.load_dataset(names[0], split=split, cache_dir=cache_dir)  # a hub name
        if missing:
            raise DataError(f"Data file {missing[0]!r} does not exist.")
        raise DataError(f"data.train_files {names}: give data files of one type, or one saved dataset directory alone.")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; the user needs one line naming the source
        raise DataError(f"Could not load {names} with datasets: {' '.join(str(exc).split())}") from None


def source_fingerprint(dataset: Any) -> str:
    """The fingerprint ``datasets`` gave the loaded data (derived from the files' paths, sizes and mtimes).

    ``_fingerprint`` is private API of ``datasets``; it is read here only, to key our cached ``map`` passes.
    """
    return str(getattr(dataset, "_fingerprint", "") or "")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)).encode())
    return h.hexdigest()


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class PackRows:
    """``datasets.map`` function (batched): tokenized samples -> rows of at most ``row_length`` tokens
    (``packing=False``: one document per row) with ``seq_lens``; each document's first label is ``-100``."""

    def __init__(self, row_length: int, packing: bool) -> None:
        self.row_length, self.packing = row_length, packing

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        lengths = [len(ids) for ids in batch["input_ids"]]
        rows = plan_rows(lengths, self.row_length) if self.packing else [[i] for i in range(len(lengths))]
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "seq_lens": []}
        for row in rows:
            ids: list[int] = []
            labels: list[int] = []
            for i in row:
                ids.extend(batch["input_ids"][i])
                labels.extend([IGNORE, *batch["labels"][i][1:]])
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["seq_lens"].append([lengths[i] for i in row])
        return out


class SFTCollator:
    """Rows of packed documents -> a batch.

    ``layout="rows"``: ``[B, L]`` with ``position_ids`` restarting at every document and no attention mask, so
    transformers' SDPA / eager / flash attention keep attention inside each document (they derive the
    documents from the position ids). Padding only trails a row and has label ``-100``; causal attention
    never lets a real token see it. ``L`` is ``pad_to`` (fixed rows) or the batch's longest row.
    ``layout="thd"``: the documents of the whole batch in one ``[1, T]`` row with ``cu_seqlens`` (see
    :func:`core.packing.pack_thd`; :class:`~lightning_automodel.callbacks.THDSqueeze` makes it 1-D for TE).
    """

    def __init__(
        self, pad_token_id: int, pad_to: int | None = None, layout: Literal["rows", "thd"] = "rows", pad_to_multiple_of: int = 1
    ) -> None:
        self.pad_token_id, self.pad_to, self.layout, self.pad_to_multiple_of = pad_token_id, pad_to, layout, pad_to_multiple_of

    def __call__(self, rows: list[Mapping[str, list[int]]]) -> dict[str, Any]:
        if self.layout == "thd":
            docs, labels = [], []
            for row in rows:
                start = 0
                for n in row["seq_lens"]:
                    docs.append(row["input_ids"][start : start + n])
                    labels.append(row["labels"][start : start + n])
                    start += n
            return pack_thd(docs, labels=labels, pad_to_multiple_of=self.pad_to_multiple_of, pad_token_id=self.pad_token_id)
        length = self.pad_to or max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        positions = torch.arange(length, dtype=torch.long).repeat(len(rows), 1)
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[b, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            labels[b, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
            start = 0
            for seq in row["seq_lens"]:
                positions[b, start : start + seq] = torch.arange(seq)
                start += seq
            # Padding continues the last document's positions: no new "document" appears, and its labels are -100.
            last = row["seq_lens"][-1] if row["seq_lens"] else 0
            positions[b, n:] = torch.arange(last, last + length - n)
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


class SFTDataModule(pl.LightningDataModule):
    """Instruction / chat / text fine-tuning data on Hugging Face ``datasets``.

    Args:
        train_files: data files (``.jsonl``, ``.json``, ``.parquet``, ``.csv``, ``.arrow``), a
            ``save_to_disk`` directory, or a hub dataset name (``org/name``, needs network).
        val_files: validation data, same forms (default: ``val_fraction`` of the training samples).
        format: ``auto`` (from the columns), ``messages``, ``prompt_completion`` or ``text``.
        columns: column mapping, e.g. ``{prompt: question, completion: answer}`` or ``{messages: conversations}``.
        tokenizer_path: a local tokenizer directory (default: the model's ``pretrained_path``).
        chat_template: a Jinja chat template that replaces the tokenizer's.
        seq_length: tokens per packed row (and the truncation length of one sample).
        batch_size: rows per batch and rank.
        packing: pack samples into rows of ``seq_length`` (best-fit decreasing over ``packing_window`` samples).
        layout: ``rows`` (``[B, seq_length]`` with per-document position ids, for transformers attention) or
            ``thd`` (one ``[1, T]`` row with ``cu_seqlens``, for Transformer Engine with ``THDSqueeze``).
        pad_to_multiple_of: with ``layout: thd``, pad each document to a multiple of this.
        mask_prompt: loss on assistant / completion tokens only (``false``: on every token).
        val_fraction: share of training samples held out for validation when ``val_files`` is not given (0: none).
        num_proc: processes of the tokenizing ``map`` (default: one).
        num_workers: DataLoader workers.
        cache_dir: where ``datasets`` keeps the Arrow files and the tokenized cache (default: its own cache).
        split: the split to read from a saved ``DatasetDict`` or a hub dataset.
        seed: shuffling seed (the same on every rank; each epoch reshuffles).
        packing_window: samples planned together by the packer (more: less padding, slower packing).
    """

    def __init__(
        self,
        train_files: str | list[str],
        val_files: str | list[str] | None = None,
        format: FormatName = "auto",
        columns: dict[str, str] | None = None,
        tokenizer_path: str | None = None,
        chat_template: str | None = None,
        seq_length: int = 2048,
        batch_size: int = 4,
        packing: bool = True,
        layout: Literal["rows", "thd"] = "rows",
        pad_to_multiple_of: int = 1,
        mask_prompt: bool = True,
        val_fraction: float = 0.0,
        num_proc: int | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
        split: str = "train",
        seed: int = 0,
        packing_window: int = 1000,
    ) -> None:
        super().__init__()
        if seq_length < 2:
            raise DataError(f"data.seq_length must be at least 2; got {seq_length}.")
        if isinstance(batch_size, bool) or batch_size < 1:
            raise DataError(f"data.batch_size must be at least 1; got {batch_size}.")
        if not 0 <= val_fraction < 1:
            raise DataError(f"data.val_fraction must be in [0, 1) (0: no validation split); got {val_fraction}.")
        if layout not in ("rows", "thd"):
            raise DataError(f"data.layout must be rows or thd; got {layout!r}.")
        self.save_hyperparameters()
        self.columns = Columns.from_mapping(columns)
        self.tokenizer: Any = None
        self.train_dataset: Any = None
        self.val_dataset: Any = None
        self.stats: dict[str, Any] = {}

    # ---- tokenizer --------------------------------------------------------------------------------

    def _model(self) -> Any:
        return self.trainer.lightning_module if self.trainer is not None else None

    def tokenizer_source(self) -> str:
        """``data.tokenizer_path``, else the model's ``pretrained_path``: the checkpoint's own tokenizer."""
        if self.hparams.tokenizer_path:
            return str(self.hparams.tokenizer_path)
        model = self._model()
        pretrained = getattr(getattr(model, "hparams", None), "get", lambda *_: None)("pretrained_path")
        if pretrained:
            return str(pretrained)
        raise DataError(
            "SFTDataModule needs a tokenizer: set data.tokenizer_path (a local tokenizer directory) or "
            "model.pretrained_path (its tokenizer is used)."
        )

    def load_tokenizer(self) -> Any:
        if self.tokenizer is not None:
            return self.tokenizer
        from transformers import AutoTokenizer

        path = self.tokenizer_source()
        if not Path(path).is_dir():
            raise DataError(f"Tokenizer directory {path!r} does not exist (we run offline: pass a local directory).")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DataError(f"Could not load a tokenizer from {path!r}: {' '.join(str(exc).split())}") from None
        if self.hparams.chat_template:
            tokenizer.chat_template = self.hparams.chat_template
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked out of the loss either way
        log.info("Tokenizer: %s (%s, vocabulary %d)", path, type(tokenizer).__name__, len(tokenizer))
        self.tokenizer = tokenizer
        return tokenizer

    def check_model(self, vocab_size: int, max_positions: int) -> None:
        """Fail before training when the tokenizer or the sequence length cannot fit the model."""
        n = len(self.load_tokenizer())
        if n > vocab_size:
            raise DataError(
                f"The tokenizer {self.tokenizer_source()!r} has {n} ids but the model's embedding has {vocab_size} rows: "
                "token ids would index past it. Use the model's own tokenizer (drop data.tokenizer_path) or resize the model."
            )
        if max_positions and self.hparams.seq_length > max_positions:
            raise DataError(
                f"data.seq_length={self.hparams.seq_length} is above the model's max_position_embeddings={max_positions}; "
                "lower data.seq_length."
            )

    # ---- building --------------------------------------------------------------------------------

    def _process(self, raw: Any, source: str) -> Any:
        """Tokenize (with loss masks), drop what truncation emptied, pack: two cached ``map`` passes."""
        hp = self.hparams
        tokenizer = self.load_tokenizer()
        fmt = resolve_format(hp.format, raw.column_names, self.columns, source)
        if fmt == "messages":
            check_chat_template(tokenizer, source)
        settings = [fmt, self.columns.__dict__, hp.seq_length, hp.mask_prompt, hp.chat_template, tokenizer_fingerprint(tokenizer)]
        tokenized = raw.map(
            SampleTokenizer(tokenizer, fmt, self.columns, hp.seq_length, hp.mask_prompt, source, hp.chat_template),
            batched=True,
            with_indices=True,
            remove_columns=raw.column_names,
            num_proc=hp.num_proc,
            new_fingerprint=_fingerprint("tokenize", source_fingerprint(raw), settings),
            desc="tokenize",
        )
        counts = self._count_status(tokenized)
        kept = tokenized.filter(
            _not_dropped, batched=True, input_columns="status", new_fingerprint=_fingerprint("filter", source_fingerprint(tokenized))
        ).remove_columns("status")
        if len(kept) == 0:
            raise DataError(
                f"{source}: no sample left after tokenizing ({counts['dropped']} of {counts['samples']} dropped because "
                f"truncation to seq_length={hp.seq_length} cut away every target token). Raise data.seq_length."
            )
        packed = kept.map(
            PackRows(hp.seq_length, hp.packing),
            batched=True,
            batch_size=hp.packing_window,
            remove_columns=kept.column_names,
            new_fingerprint=_fingerprint("pack", source_fingerprint(kept), hp.seq_length, hp.packing, hp.packing_window),
            desc="pack",
        )
        counts.update(self._row_stats(packed))
        if counts["dropped"] or counts["cut"]:
            log.warning(
                "%s: %d of %d samples longer than seq_length=%d: %d cut (targets truncated), %d dropped (no target left).",
                source, counts["dropped"] + counts["cut"], counts["samples"], hp.seq_length, counts["cut"], counts["dropped"],
            )
        log.info(
            "%s: format %s, %d samples -> %d rows, %d tokens, padding waste %.1f%% of %s rows.",
            source, fmt, counts["samples"] - counts["dropped"], counts["rows"], counts["tokens"],
            100 * counts["padding_waste"], f"{hp.seq_length}-token" if hp.packing else "padded-to-longest",
        )
        return packed, counts

    @staticmethod
    def _count_status(tokenized: Any) -> dict[str, Any]:
        import pyarrow.compute as pc

        status = tokenized.data.column("status")
        return {
            "samples": len(tokenized),
            "cut": int(pc.sum(pc.equal(status, CUT)).as_py() or 0),
            "dropped": int(pc.sum(pc.equal(status, DROPPED)).as_py() or 0),
        }

    def _row_stats(self, packed: Any) -> dict[str, Any]:
        import pyarrow.compute as pc

        tokens, rows = int(pc.sum(pc.list_value_length(packed.data.column("input_ids"))).as_py() or 0), len(packed)
        capacity = rows * self.hparams.seq_length if self.hparams.packing else tokens  # unpacked: see batch_waste
        return {"rows": rows, "tokens": tokens, "padding_waste": 1 - tokens / capacity if capacity else 0.0}

    def _build(self) -> None:
        hp = self.hparams
        raw = load_raw_dataset(hp.train_files, hp.split, hp.cache_dir)
        source, val_raw = str(hp.train_files), None
        if hp.val_files:
            val_raw = load_raw_dataset(hp.val_files, hp.split, hp.cache_dir)
        elif hp.val_fraction > 0 and len(raw) > 1:
            parts = raw.train_test_split(test_size=hp.val_fraction, seed=hp.seed, shuffle=True)
            raw, val_raw = parts["train"], parts["test"]
        self.train_dataset, self.stats = self._process(raw, source)
        if val_raw is not None:
            self.val_dataset, _ = self._process(val_raw, str(hp.val_files or f"{source} (validation split)"))

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        model = self._model()
        if model is not None and hasattr(model, "vocab_size"):
            self.check_model(model.vocab_size, model.max_positions)
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # Rank 0 tokenizes and writes the cache; the other ranks then find it by fingerprint.
        if rank != 0:
            trainer.strategy.barrier("sft_data")
        self._build()
        if world > 1 and rank == 0:
            trainer.strategy.barrier("sft_data")
        per_rank = len(self.train_dataset) // world
        if per_rank < self.hparams.batch_size:
            raise DataError(
                f"{self.hparams.train_files}: {len(self.train_dataset)} rows over {world} rank(s) give {per_rank} per rank, "
                f"fewer than data.batch_size={self.hparams.batch_size}: no full batch. Lower data.batch_size or add data."
            )

    # ---- loaders ---------------------------------------------------------------------------------

    def collator(self) -> SFTCollator:
        hp = self.hparams
        pad = self.load_tokenizer().pad_token_id or 0
        return SFTCollator(pad, hp.seq_length if hp.packing and hp.layout == "rows" else None, hp.layout, hp.pad_to_multiple_of)

    def train_dataloader(self) -> Any:
        from torchdata.stateful_dataloader import StatefulDataLoader

        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # Our own sampler, one shard per rank: Lightning leaves a DistributedSampler alone (no re-instantiation)
        # and calls its set_epoch; StatefulDataLoader records how far into it this epoch got.
        sampler = DistributedSampler(
            self.train_dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.hparams.seed, drop_last=True
        )
        return StatefulDataLoader(
            self.train_dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=self.collator(),
            num_workers=self.hparams.num_workers,
            drop_last=True,
        )

    def val_dataloader(self) -> Any:
        if self.val_dataset is None or not len(self.val_dataset):
            return []
        return DataLoader(self.val_dataset, batch_size=self.hparams.batch_size, collate_fn=self.collator(), num_workers=self.hparams.num_workers)


def _not_dropped(status: list[int]) -> list[bool]:
    return [s != DROPPED for s in status]
