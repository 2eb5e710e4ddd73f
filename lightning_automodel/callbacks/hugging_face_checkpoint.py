"""Write a Hugging Face directory during training, from all ranks, without gathering the model on one."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_automodel.core.discovery import find_hf_model
from lightning_automodel.core.hub_layout import hub_model_info, record_export_info, source_directory
from lightning_automodel.core.hub_writer import (
    PublishRefused,
    check_replaceable,
    full_tensor,
    heads_equal_on_all_ranks,
    module_state,
    parse_size,
    plan_hub_write,
    remove_stale_staging,
    staging_directory,
    write_adapter_directory,
    write_hub_files,
    write_published,
)
from lightning_automodel.core.logs import rank_zero_logger
from lightning_automodel.core.lora import ADAPTER_NAME, is_adapter_name
from lightning_automodel.core.lora_merge import LoraMerge, LoraMergeError, refuse_quantized_base

log = rank_zero_logger(__name__)  # one line per job: rank 0's


def check_target_is_not_source(target: Path, source: Path, *, what: str) -> None:
    """Refuse a save target that is, contains or lies inside the model's source directory: publishing replaces it."""
    t, s = target.resolve(), source.resolve()
    relation = "is" if t == s else "contains" if s.is_relative_to(t) else "is inside" if t.is_relative_to(s) else None
    if relation is not None:
        raise ValueError(
            f"{what}: {target} {relation} the model's source directory {source} (model.pretrained_path); "
            "saving there would replace or change it. Choose another dirpath."
        )


def _check_replaceable(path: Path, error: type[Exception], what: str) -> None:
    """Refuse now, not after hours of training, a target that publishing would not replace (checked again then)."""
    if path.exists() or path.is_symlink():
        try:
            check_replaceable(path)
        except PublishRefused as exc:
            raise error(f"{what}: {exc}") from None


def is_last_step(trainer: pl.Trainer) -> bool:
    """Whether the optimizer step just taken is the fit's last (``max_steps`` reached, or the last batch of ``max_epochs``)."""
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    return bool(max_epochs is not None and max_epochs > 0 and trainer.current_epoch >= max_epochs - 1 and trainer.is_last_batch)


class HuggingFaceCheckpoint(Callback):
    """Save the trained model as a Hugging Face directory (``from_pretrained`` loads it) during ``fit``.

    Writes ``dirpath/final`` at the end of ``fit`` and ``dirpath/step-<N>`` every ``every_n_train_steps`` steps from
    every rank, published with one rename (a crash leaves the old or the new directory); all nodes must see ``dirpath``.
    Every Lightning checkpoint also records what ``export`` needs.

    Args:
        dirpath: where the directories go (default: ``<trainer.default_root_dir>/hf``).
        every_n_train_steps: also save every N optimizer steps (0: only at the end of fit).
        save_on_train_end: write ``final`` when fit ends.
        max_shard_size: largest output file, e.g. ``"5GB"``.
        dtype: ``auto`` (the parameters' dtypes), ``bf16`` or ``fp32``.
        tokenizer_path: copy the tokenizer from this local directory (default: the weights' source directory).
        adapter_only: with LoRA, write peft's adapter directory (``PeftModel.from_pretrained(base, DIR)`` loads it)
            instead of the model with the adapters merged.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        every_n_train_steps: int = 0,
        save_on_train_end: bool = True,
        max_shard_size: str = "5GB",
        dtype: Literal["auto", "bf16", "fp32"] = "auto",
        tokenizer_path: str | None = None,
        adapter_only: bool = False,
    ) -> None:
        from lightning_automodel.core.dtypes import export_dtype

        if every_n_train_steps < 0:
            raise MisconfigurationException(f"HuggingFaceCheckpoint(every_n_train_steps=...) must be >= 0; got {every_n_train_steps}.")
        if dtype not in ("auto", "bf16", "fp32"):
            raise MisconfigurationException(f"HuggingFaceCheckpoint(dtype=...) must be auto, bf16 or fp32; got {dtype!r}.")
        try:
            self._max_shard_bytes = parse_size(max_shard_size, f"HuggingFaceCheckpoint(max_shard_size={max_shard_size!r})")
        except ValueError as exc:
            raise MisconfigurationException(str(exc)) from None
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps
        self.save_on_train_end = save_on_train_end
        self.dtype = export_dtype(dtype)
        self.tokenizer_path = tokenizer_path
        self.adapter_only = adapter_only
        self._layout_model: Any = None
        self._merge: LoraMerge | None = None
        self._last_step = -1
        self.last_saved: Path | None = None

    @property
    @override
    def state_key(self) -> str:
        return "HuggingFaceCheckpoint"

    def _root(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath is not None else Path(trainer.default_root_dir) / "hf"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._layout_model = self._merge = None  # another fit may train (and adapt) another model
        if stage != "fit":
            return
        root = self._root(trainer)
        source = (getattr(pl_module, "hparams", None) or {}).get("pretrained_path")
        if source:
            check_target_is_not_source(root, Path(source), what="HuggingFaceCheckpoint(dirpath=...)")
        if self.save_on_train_end:
            _check_replaceable(root / "final", ValueError, "HuggingFaceCheckpoint(dirpath=...)")
        if trainer.is_global_zero:
            remove_stale_staging(root)  # only staging directories of killed saves (our signature, process gone)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        record_export_info(pl_module, checkpoint)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step > 0 and trainer.global_step % n == 0 and self._last_step != trainer.global_step:
            if self.save_on_train_end and is_last_step(trainer):
                return  # `final` is written in a moment with these weights: one copy, not step-N and final
            self.save(trainer, pl_module, self._root(trainer) / f"step-{trainer.global_step:07d}")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_on_train_end:
            self.save(trainer, pl_module, self._root(trainer) / "final")

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, out: Path) -> Path:
        """Write ``out`` from every rank (a collective: all ranks call it)."""
        from lightning_automodel.core.model_build import build_meta_model_for

        strategy = trainer.strategy
        prefix, model = find_hf_model(pl_module)
        if not hasattr(model, "config"):
            raise MisconfigurationException("HuggingFaceCheckpoint needs a Hugging Face model (a transformers PreTrainedModel) in the LightningModule.")
        source = source_directory(pl_module)
        info = hub_model_info(prefix, model, source)
        if self._layout_model is None:
            self._layout_model = build_meta_model_for(info, Path("<the LightningModule>"))
        if source is not None:
            check_target_is_not_source(out, Path(source), what="HuggingFaceCheckpoint")
        _check_replaceable(out, MisconfigurationException, "HuggingFaceCheckpoint")
        state = module_state(model)
        lora = any(is_adapter_name(name) for name in state)
        marker = f"HuggingFaceCheckpoint step {trainer.global_step}"
        if self.adapter_only:
            if not lora:
                raise MisconfigurationException("HuggingFaceCheckpoint(adapter_only=True) needs LoRA adapters: add the LoRA callback, or drop adapter_only.")
            adapters = {name: full_tensor(t) for name, t in state.items() if is_adapter_name(name)}  # collectives: every rank
            if trainer.is_global_zero:
                write_published(out, partial(write_adapter_directory, config=model.peft_config[ADAPTER_NAME], adapters=adapters,
                                             base_model=info.source), marker=marker, replace=True)
                log.info(f"LoRA adapter saved at {out} (step {trainer.global_step}; PeftModel.from_pretrained(base, DIR) loads it).")
            return self._saved(trainer, out)
        merge = self._lora_merge(model, state) if lora else None
        config = self._layout_model.config.__class__.from_dict(model.config.to_dict())
        specs = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
        try:
            layout = plan_hub_write(self._layout_model, config, specs, dtype=self.dtype, merge=merge,
                                    heads_equal=partial(heads_equal_on_all_ranks, state, device=strategy.root_device))
        except ValueError as exc:
            raise MisconfigurationException(f"HuggingFaceCheckpoint: {exc}") from None
        tokenizer = Path(self.tokenizer_path) if self.tokenizer_path else (Path(info.source) if info.source else None)
        staging = Path(strategy.broadcast(str(staging_directory(out)) if trainer.is_global_zero else None))
        write = partial(
            write_hub_files, layout_model=self._layout_model, layout=layout, config=config, max_shard_bytes=self._max_shard_bytes,
            dtype=self.dtype, tokenizer_dir=tokenizer, state=state, merge=merge, rank=trainer.global_rank,
            world_size=trainer.world_size, device=strategy.root_device,
        )
        write_published(out, write, marker=marker, replace=True, staging=staging, owner=trainer.is_global_zero)
        log.info(f"Hugging Face model saved at {out} (step {trainer.global_step}).")
        return self._saved(trainer, out)

    def _saved(self, trainer: pl.Trainer, out: Path) -> Path:
        trainer.strategy.barrier("hf_checkpoint_published")
        self._last_step = trainer.global_step
        self.last_saved = out
        return out

    def _lora_merge(self, model: Any, state: dict[str, Any]) -> LoraMerge:
        """How this LoRA model's adapters merge (built once: the adapted names do not change during fit)."""
        if self._merge is None:
            config = (getattr(model, "peft_config", None) or {}).get(ADAPTER_NAME)
            if config is None:
                raise MisconfigurationException(
                    "HuggingFaceCheckpoint: the model has LoRA adapters but no peft_config to merge them with; "
                    "use the LoRA callback, or HuggingFaceCheckpoint(adapter_only=True)."
                )
            try:
                refuse_quantized_base(model)
                self._merge = LoraMerge(self._layout_model, config, state)
            except LoraMergeError as exc:
                raise MisconfigurationException(f"HuggingFaceCheckpoint: {exc}") from None
        return self._merge

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_saved": str(self.last_saved) if self.last_saved else None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        last = state_dict.get("last_saved")
        self.last_saved = Path(last) if last else None
