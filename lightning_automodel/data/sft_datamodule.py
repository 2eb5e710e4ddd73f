"""The one data module: memory-mapped Arrow, fingerprint-cached tokenize/pack passes, mid-epoch resumable loading."""

from __future__ import annotations

import random
from importlib import resources
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning.pytorch as pl
import pyarrow.compute as pc
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader, DistributedSampler

from lightning_automodel.core.logs import rank_zero_logger
from lightning_automodel.core.packing import plan_rows
from lightning_automodel.data.collators import SFTCollator
from lightning_automodel.data.formats import CUT, DROPPED, IGNORE, MAX_PIECE_CHARS, Columns, DataError, FormatName
from lightning_automodel.data.formats import SampleTokenizer, read_paragraphs, read_records, resolve_format
from lightning_automodel.data.tokenizer import has_tokenizer, load_tokenizer

log = rank_zero_logger(__name__)  # every rank prepares the same data: rank 0 says so

_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow", ".txt": "txt"}


def shipped_corpus() -> list[str]:
    """Paths of the small corpus that ships with the package (the embedded demo trains on it)."""
    root = resources.files("lightning_automodel.data") / "corpus"
    return sorted(str(p) for p in root.iterdir() if p.name.endswith(".txt"))


def _no_samples(role: str, files: Any) -> DataError:
    return DataError(f"The {role} files {files} contain no text or samples (empty files?); add data or drop them.")


def _rows(files: list[str], role: str) -> Any:
    """Records of .json/.jsonl files, or one ``{"text": paragraph}`` per paragraph of .txt files."""
    empty = True
    for path in map(Path, files):
        rows = read_records(path) if path.suffix.lower() != ".txt" else ({"text": p} for p in read_paragraphs(path))
        for row in rows:
            empty = False
            yield row
    if empty:  # datasets refuses an empty generator with a line about its internals
        raise _no_samples(role, files)


def _builder_for(files: list[str]) -> str:
    suffixes = {Path(name).suffix.lower() for name in files}
    if unknown := sorted(suffixes - set(_BUILDERS)):
        raise DataError(
            f"Data files {files}: unsupported type {unknown[0] or '(none)'}; use .txt, .jsonl, .json, .parquet, .csv, "
            ".arrow or a directory written by Dataset.save_to_disk."
        )
    builders = {_BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise DataError(f"Data files {files} mix formats ({sorted(builders)}); give files of one type per split.")
    return builders.pop()


def load_raw_dataset(files: str | list[str], split: str = "train", cache_dir: str | None = None, role: str = "training") -> Any:
    """A ``datasets.Dataset`` from local files, a ``save_to_disk`` directory or (online) a hub dataset name."""
    names = [files] if isinstance(files, str) else list(files)
    if not names:
        raise DataError("data.train_files is empty: give data files, a saved dataset directory or a hub dataset name.")
    local = [Path(n) for n in names]
    try:
        if len(local) == 1 and local[0].is_dir():
            loaded = datasets.load_from_disk(str(local[0]))
            return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        if all(p.is_file() for p in local):
            builder = _builder_for(names)
            if builder not in ("txt", "json"):
                return datasets.load_dataset(builder, data_files=names, split="train", cache_dir=cache_dir)
            # Text and JSON are read by our streaming readers (pyarrow's JSON reader overflows its stack on deeply
            # nested lines); the files' sizes and times key the cache.
            stamp = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in local]
            text = datasets.Features({"text": datasets.Value("string")}) if builder == "txt" else None
            return datasets.Dataset.from_generator(
                _rows, text, cache_dir, gen_kwargs={"files": names, "role": role},
                fingerprint=Hasher.hash((builder, stamp, MAX_PIECE_CHARS)),
                writer_batch_size=16 if text else 1000,  # .txt rows hold up to MAX_PIECE_CHARS characters
            )
        missing = [n for n, p in zip(names, local) if not p.exists()]
        if len(names) == 1 and not Path(names[0]).suffix and "/" in names[0] and not names[0].startswith(("/", ".")):
            return datasets.load_dataset(names[0], split=split, cache_dir=cache_dir)  # a hub name
        if missing:
            raise DataError(f"Data file {missing[0]!r} does not exist.")
        special = [n for n, p in zip(names, local) if not p.is_file() and not p.is_dir()]
        if special:  # a FIFO or a device never ends (or blocks)
            raise DataError(f"Data file {special[0]!r} is not a regular file; pass data files.")
        raise DataError(f"data.train_files {names}: give data files of one type, or one saved dataset directory alone.")
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; the user needs one line naming the source
        if isinstance(cause := exc.__cause__ or exc.__context__, DataError):  # our reader's line, wrapped by datasets
            raise cause from None
        raise DataError(f"Could not load {names} with datasets: {' '.join(str(exc).split())}") from None


class PackRows:
    """``datasets.map`` (batched): samples -> rows of <= ``row_length`` tokens with ``seq_lens``, first labels -100."""

    def __init__(self, row_length: int, packing: bool) -> None:
        self.row_length, self.packing = row_length, packing

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        lengths = [len(ids) for ids in batch["input_ids"]]
        sample_labels = batch["labels"] if "labels" in batch else batch["input_ids"]  # text: every token
        kept = [i for i, n in enumerate(lengths) if n]  # a dropped sample is empty
        rows = [[i] for i in kept]
        if self.packing:
            rows = [[kept[j] for j in row] for row in plan_rows([lengths[i] for i in kept], self.row_length)]
        out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "seq_lens": []}
        for row in rows:
            out["input_ids"].append(list(chain.from_iterable(batch["input_ids"][i] for i in row)))
            out["labels"].append(list(chain.from_iterable([IGNORE, *sample_labels[i][1:]] for i in row)))
            out["seq_lens"].append([lengths[i] for i in row])
        return out


# A user's data trains as SFT does (long packed rows, no hold-out); the demo corpus suits the tiny CPU models.
DEFAULTS = {"seq_length": 2048, "packing": True, "val_fraction": 0.0}
DEMO_DEFAULTS = {"seq_length": 128, "packing": False, "val_fraction": 0.1}


def resolve_defaults(train_files: Any, seq_length: Any, packing: Any, val_fraction: Any) -> tuple[Any, Any, Any]:
    """``seq_length``, ``packing``, ``val_fraction`` as given, else the defaults for the data named."""
    defaults = DEMO_DEFAULTS if train_files is None else DEFAULTS
    return tuple(defaults[k] if v is None else v for k, v in zip(DEFAULTS, (seq_length, packing, val_fraction)))


class SFTDataModule(pl.LightningDataModule):
    """Fine-tuning data of every format: chat messages, prompt/completion, plain text (also ``.txt`` files).

    Args:
        train_files: .txt (a document a paragraph)/.jsonl/.json/.parquet/.csv/.arrow files, a ``save_to_disk`` directory
            or a hub dataset name (``org/name``, online); none: the shipped demo corpus.
        val_files: validation data, same forms (default: ``val_fraction`` of the training samples).
        test_files: test data, same forms (default: ``test_fraction`` of the training samples).
        format: ``auto`` (from the columns), ``messages``, ``prompt_completion`` or ``text``.
        columns: column mapping, e.g. ``{prompt: question, completion: answer}`` or ``{messages: conversations}``.
        tokenizer_path: a local tokenizer directory (default: the model's ``pretrained_path``, else a byte tokenizer).
        chat_template: a Jinja chat template that replaces the tokenizer's.
        seq_length: tokens per row (a sample's truncation length; text windows). Default 2048; 128 on the demo corpus.
        batch_size: rows per batch and rank.
        packing: pack samples into ``seq_length`` rows (best fit over ``packing_window`` samples); default on, demo off.
        layout: ``rows`` (``[B, L]``, per-document position ids) or ``thd`` (``[1, T]`` with ``cu_seqlens``, for TE).
        pad_to_multiple_of: with ``layout: thd``, pad each document to a multiple of this.
        mask_prompt: loss on assistant / completion tokens only (``false``: on every token).
        val_fraction: share of training samples held out for validation without ``val_files``. Default 0; 0.1 on demo.
        test_fraction: share held out for ``test`` when ``test_files`` is not given (0: none), after validation's.
        num_proc: processes of the tokenizing ``map`` (default: one).
        num_workers: DataLoader workers.
        cache_dir: where ``datasets`` keeps the Arrow files and the tokenized cache (default: its own cache).
        split: the split to read from a saved ``DatasetDict`` or a hub dataset.
        seed: hold-out and shuffling seed (the same on every rank; each epoch reshuffles).
        packing_window: samples planned together by the packer (more: less padding, slower packing).
    """

    def __init__(
        self,
        train_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        test_files: str | list[str] | None = None,
        format: FormatName = "auto",
        columns: dict[str, str] | None = None,
        tokenizer_path: str | None = None,
        chat_template: str | None = None,
        seq_length: int | None = None,
        batch_size: int = 4,
        packing: bool | None = None,
        layout: Literal["rows", "thd"] = "rows",
        pad_to_multiple_of: int = 1,
        mask_prompt: bool = True,
        val_fraction: float | None = None,
        test_fraction: float = 0.0,
        num_proc: int | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
        split: str = "train",
        seed: int = 0,
        packing_window: int = 1000,
    ) -> None:
        super().__init__()
        seq_length, packing, val_fraction = resolve_defaults(train_files, seq_length, packing, val_fraction)
        if seq_length < 2:
            raise DataError(f"data.seq_length must be at least 2; got {seq_length}.")
        if isinstance(batch_size, bool) or batch_size < 1:
            raise DataError(f"data.batch_size must be at least 1; got {batch_size}.")
        if isinstance(pad_to_multiple_of, bool) or pad_to_multiple_of < 1:  # the collator would refuse it mid-run
            raise DataError(f"data.pad_to_multiple_of must be at least 1 (1: no padding); got {pad_to_multiple_of}.")
        if not 0 <= val_fraction < 1:  # also NaN
            raise DataError(f"data.val_fraction must be in (0, 1), or 0 for no validation split; got {val_fraction}.")
        if not 0 <= test_fraction < 1 or not val_fraction + test_fraction < 1:
            raise DataError(
                f"data.test_fraction must be in [0, 1) and val_fraction + test_fraction below 1 (the share held out for "
                f"test; 0: none); got test_fraction={test_fraction}, val_fraction={val_fraction}."
            )
        if layout not in ("rows", "thd"):
            raise DataError(f"data.layout must be rows or thd; got {layout!r}.")
        self.save_hyperparameters()
        # LightningCLI records the config's values (None for these): the checkpoint and the run use the resolved ones
        self.hparams.update(seq_length=seq_length, packing=packing, val_fraction=val_fraction)
        self.columns = Columns.from_mapping(columns)
        self.tokenizer: Any = None
        self.train_dataset = self.val_dataset = self.test_dataset = None
        self.stats: dict[str, Any] = {}
        if tokenizer_path:  # loaded now when named (the CLI names it), else at setup: the model's own, or bytes
            self.load_tokenizer()

    def _model(self) -> Any:
        return self.trainer.lightning_module if self.trainer is not None else None

    def load_tokenizer(self) -> Any:
        """``data.tokenizer_path``, else the model's ``pretrained_path`` (its own tokenizer), else the byte tokenizer."""
        if self.tokenizer is not None:
            return self.tokenizer
        path = self.hparams.tokenizer_path or getattr(self._model(), "hparams", {}).get("pretrained_path")
        if path and not self.hparams.tokenizer_path and not has_tokenizer(str(path)):
            log.warning("model.pretrained_path %s has no tokenizer files: training on the byte tokenizer.", path)
            path = None
        self.tokenizer = load_tokenizer(str(path) if path else None, self.hparams.chat_template)
        log.info("Tokenizer: %s (%s, vocabulary %d)", path or "byte tokenizer", type(self.tokenizer).__name__, len(self.tokenizer))
        return self.tokenizer

    def check_model(self, vocab_size: int, max_positions: int) -> None:
        """Fail before training when the tokenizer or the sequence length cannot fit the model."""
        tokenizer = self.load_tokenizer()
        if len(tokenizer) > vocab_size:
            raise DataError(
                f"The tokenizer has {len(tokenizer)} ids but the model's embedding has {vocab_size} rows "
                f"({getattr(tokenizer, 'name_or_path', '')}): token ids would index past it. Use the model's own "
                "tokenizer (drop data.tokenizer_path) or resize the model."
            )
        if max_positions and self.hparams.seq_length > max_positions:
            raise DataError(
                f"data.seq_length={self.hparams.seq_length} is above the model's max_position_embeddings={max_positions}; "
                "lower data.seq_length."
            )

    def _process(self, raw: Any, source: str) -> tuple[Any, dict[str, Any]]:
        """Tokenize (with loss masks), drop what truncation emptied, pack: cached ``map`` passes."""
        hp = self.hparams
        tokenizer = self.load_tokenizer()
        fmt = resolve_format(hp.format, raw.column_names, self.columns, source)
        if fmt == "messages" and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"{source} holds chat messages but the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
                "template. Use a chat/instruct checkpoint's tokenizer (data.tokenizer_path) or give data.chat_template "
                "(a Jinja string)."
            )
        ids = datasets.List(datasets.Value("int32"))  # half of int64's cache and of the memory that reads it
        schema = {"input_ids": ids, "status": datasets.Value("int8")} | ({} if fmt == "text" else {"labels": ids})
        features = datasets.Features(schema)  # in the key too: a cache written with another schema is not this one
        settings = [fmt, self.columns.__dict__, hp.seq_length, hp.mask_prompt, hp.chat_template]
        settings += [Hasher.hash(tokenizer), repr(features)]
        # _fingerprint is private API of datasets (derived from the files' paths, sizes and mtimes): read, never set.
        log.info("%s: tokenizing %d samples (format %s).", source, len(raw), fmt)
        tokenized = raw.map(
            SampleTokenizer(tokenizer, fmt, self.columns, hp.seq_length, hp.mask_prompt, source, hp.chat_template),
            batched=True,
            batch_size=4,  # .txt rows hold up to MAX_PIECE_CHARS characters each: keep the Python lists small
            with_indices=True,
            remove_columns=raw.column_names,
            features=features,
            num_proc=hp.num_proc,
            new_fingerprint=Hasher.hash(("tokenize", raw._fingerprint, settings)),
            desc="tokenize",
        )
        cut, dropped = (int(pc.sum(pc.equal(tokenized.data.column("status"), v)).as_py() or 0) for v in (CUT, DROPPED))
        counts = {"samples": len(raw), "cut": cut, "dropped": dropped}
        packed = tokenized.map(
            PackRows(hp.seq_length, hp.packing),
            batched=True,
            batch_size=hp.packing_window,
            remove_columns=tokenized.column_names,
            new_fingerprint=Hasher.hash(("pack", tokenized._fingerprint, hp.packing, hp.packing_window)),
            desc="pack",
        )
        if len(packed) == 0:
            raise DataError(
                f"{source}: no sample left after tokenizing ({counts['dropped']} of {counts['samples']} dropped because "
                f"truncation to seq_length={hp.seq_length} cut away every target token). Raise data.seq_length."
            )
        tokens = int(pc.sum(pc.list_value_length(packed.data.column("input_ids"))).as_py() or 0)
        capacity = len(packed) * hp.seq_length if hp.packing else tokens  # unpacked rows are padded per batch
        counts.update(rows=len(packed), tokens=tokens, padding_waste=1 - tokens / capacity if capacity else 0.0)
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

    def _load(self, files: str | list[str], split: str) -> Any:
        raw = load_raw_dataset(files, self.hparams.split, self.hparams.cache_dir, split)
        if len(raw) == 0:  # named files that give nothing: no silent run without the split
            raise _no_samples(split, files)
        return raw

    def _build_splits(self) -> None:
        hp = self.hparams
        source = str(hp.train_files or "the shipped demo corpus")
        raw = self._load(hp.train_files or shipped_corpus(), "training")
        total = len(raw)
        n_val = 0 if hp.val_files or total < 2 or not hp.val_fraction else max(1, int(total * hp.val_fraction))
        n_test = 0 if hp.test_files or total - n_val < 2 or not hp.test_fraction else max(1, int(total * hp.test_fraction))
        held: dict[str, Any] = {"validation": None, "test": None}
        if n_val + n_test:
            order = list(range(total))
            random.Random(hp.seed).shuffle(order)
            held = {"validation": raw.select(order[:n_val]), "test": raw.select(order[n_val : n_val + n_test])}
            raw = raw.select(order[n_val + n_test :])
        self.train_dataset, self.stats = self._process(raw, source)
        self.stats["held_out"] = n_val
        for split, files in (("validation", hp.val_files), ("test", hp.test_files)):
            part = self._load(files, split) if files else held[split]
            if part is not None and len(part):
                dataset, _ = self._process(part, str(files or f"{source} ({split} split)"))
                setattr(self, f"{'val' if split == 'validation' else split}_dataset", dataset)

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
        # datasets' progress bars would surround a bad input's one error line; our log lines report each pass.
        enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            self._build_splits()
        finally:
            if enabled:
                datasets.enable_progress_bars()
        if world > 1 and rank == 0:
            trainer.strategy.barrier("sft_data")
        per_rank, hp, stats = len(self.train_dataset) // world, self.hparams, self.stats
        if per_rank < hp.batch_size:
            held = f", {stats['held_out']} held out for validation" if stats["held_out"] else ""
            ranks = f" over {world} ranks ({per_rank} per rank)" if world > 1 else ""
            raise DataError(
                f"{hp.train_files or 'The shipped corpus'}: the training data ({stats['samples'] - stats['dropped']} "
                f"documents{held}, {stats['tokens']} tokens) gives {stats['rows']} windows of 2 to {hp.seq_length} "
                f"tokens{ranks}, fewer than batch_size={hp.batch_size}: no full training batch. "
                f"Lower data.batch_size to at most {per_rank} or add data."
            )

    def collator(self) -> SFTCollator:
        hp = self.hparams
        pad = self.load_tokenizer().pad_token_id or 0
        return SFTCollator(pad, hp.seq_length if hp.packing and hp.layout == "rows" else None, hp.layout, hp.pad_to_multiple_of)

    def train_dataloader(self) -> Any:
        from torchdata.stateful_dataloader import StatefulDataLoader

        hp, trainer = self.hparams, self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # Lightning keeps our DistributedSampler (calls set_epoch); StatefulDataLoader records how far this epoch got.
        sampler = DistributedSampler(self.train_dataset, world, rank, shuffle=True, seed=hp.seed, drop_last=True)
        return StatefulDataLoader(
            self.train_dataset, hp.batch_size, sampler=sampler, collate_fn=self.collator(), num_workers=hp.num_workers,
            drop_last=True,
        )

    def _eval_loader(self, dataset: Any) -> DataLoader:
        return DataLoader(dataset, self.hparams.batch_size, collate_fn=self.collator(), num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> Any:
        return self._eval_loader(self.val_dataset) if self.val_dataset is not None else []

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            raise DataError(
                "There is no test split: set data.test_fraction (a share of the training samples, e.g. 0.05) "
                "or data.test_files."
            )
        return self._eval_loader(self.test_dataset)
