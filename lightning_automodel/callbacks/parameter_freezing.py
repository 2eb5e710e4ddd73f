"""Freeze parameters by configuration, before the optimizer sees them; a resume keeps the checkpoint's set
(another set fails in the optimizer load or silently resumes a different run: compared before it loads)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_automodel.callbacks._lifecycle import (
    FrozenSetDiff,
    ModelSurgeryCallback,
    apply_frozen_set,
    frozen_names,
    frozen_set_diff,
    read_callback_states,
    saved_state,
)
from lightning_automodel.core.discovery import find_hf_model
from lightning_automodel.core.distributed import digest_names
from lightning_automodel.core.freezing import FreezeConfig, apply_parameter_freezing, parse_freeze_config
from lightning_automodel.core.logs import rank_zero_logger
from lightning_automodel.core.naming import canonical_name
from lightning_automodel.strategies import names_with_optimizer_state, preview

log = rank_zero_logger(__name__)  # one line per job: rank 0's

ResumeMismatchPolicy = Literal["restore", "error"]
_CHECKPOINT_RULE = "checkpoint's frozen set"


def _parse(raw: Mapping[str, Any]) -> FreezeConfig:
    try:
        return parse_freeze_config(raw)
    except (TypeError, ValueError) as exc:
        raise MisconfigurationException(f"ParameterFreezing: {exc}") from exc


def _saved_optimizer_names(checkpoint: Mapping[str, Any], model: nn.Module, saved_frozen: set[str]) -> list[dict[int, str]] | None:
    """Per saved optimizer of a full checkpoint: position -> name (the model's parameters minus the saved frozen
    set, in module order); None when the counts differ (another layout)."""
    states = checkpoint.get("optimizer_states")
    if not isinstance(states, list) or not states:
        return None
    trained = [name for name in (canonical_name(n) for n, _ in model.named_parameters()) if name not in saved_frozen]
    positions = [[i for group in state.get("param_groups", []) for i in group.get("params", [])] for state in states]
    if sum(len(p) for p in positions) != len(trained):
        return None
    names, offset = [], 0
    for saved in positions:
        names.append({position: trained[offset + k] for k, position in enumerate(saved)})
        offset += len(saved)
    return names


class ParameterFreezing(ModelSurgeryCallback):
    """Freeze towers and modules of the Hugging Face model by config (NeMo AutoModel's freeze config).

    Selectors are ``{path: ...}`` (exact) or ``{glob: ...}`` (``*`` crosses dots) over module paths of the
    Hugging Face model (``model.vision_tower``, ``lm_head``). One per Trainer: a resume finds its saved set.

    Args:
        freeze_vision_tower: freeze vision modules (``None``: only when no selectors are given).
        freeze_audio_tower: freeze audio modules.
        freeze_language_model: freeze the language model.
        freeze_video_embedder: freeze ``patch_generator.video_embedder`` (unused on image-only data).
        freeze_modules: selectors of modules to freeze.
        unfreeze_modules: selectors of modules to keep trainable (wins on overlap).
        strict: a selector that matches no parameter is an error.
        on_resume_mismatch: a resume from a checkpoint trained with another frozen set: ``"restore"`` re-applies
            the checkpoint's set with a warning, ``"error"`` stops (both before any optimizer state loads).
            To train a new set, start a new fit from the checkpoint's weights. (YAML example: README.md.)
    """

    surgery_order: ClassVar[int] = 10

    def __init__(
        self,
        freeze_vision_tower: bool | None = None,
        freeze_audio_tower: bool = False,
        freeze_language_model: bool = False,
        freeze_video_embedder: bool = False,
        freeze_modules: Sequence[dict[str, str]] = (),
        unfreeze_modules: Sequence[dict[str, str]] = (),
        strict: bool = True,
        on_resume_mismatch: ResumeMismatchPolicy = "restore",
    ) -> None:
        super().__init__()
        if on_resume_mismatch not in ("restore", "error"):
            raise MisconfigurationException(
                f"ParameterFreezing: on_resume_mismatch must be 'restore' or 'error'; got {on_resume_mismatch!r}."
            )
        raw: dict[str, Any] = {
            "freeze_audio_tower": freeze_audio_tower,
            "freeze_language_model": freeze_language_model,
            "freeze_video_embedder": freeze_video_embedder,
        }
        if freeze_vision_tower is not None:
            raw["freeze_vision_tower"] = freeze_vision_tower
        # Empty lists mean "not declared", so ParameterFreezing() keeps the reference default.
        if freeze_modules:
            raw["freeze_modules"] = [dict(s) for s in freeze_modules]
        if unfreeze_modules:
            raw["unfreeze_modules"] = [dict(s) for s in unfreeze_modules]
        self.config: FreezeConfig = _parse(raw)
        self.strict = strict
        self.on_resume_mismatch = on_resume_mismatch
        self._count_pending = False

    @classmethod
    def from_config(
        cls, freeze_config: Mapping[str, Any], strict: bool = True, on_resume_mismatch: ResumeMismatchPolicy = "restore"
    ) -> ParameterFreezing:
        """Build from a reference-style ``freeze_config`` mapping (validated, unknown keys rejected)."""
        config = _parse(freeze_config)
        selectors = {
            key: [{"path": s.path} if s.path else {"glob": s.glob} for s in getattr(config, key) or ()]
            for key in ("freeze_modules", "unfreeze_modules")
        }
        flags = {key: getattr(config, key) for key in ("freeze_vision_tower", "freeze_audio_tower", "freeze_language_model", "freeze_video_embedder")}
        return cls(**flags, **selectors, strict=strict, on_resume_mismatch=on_resume_mismatch)

    def freeze(self, model: nn.Module) -> dict[str, str]:
        """Apply the configured freeze to a model (also used by ``lightning-automodel plan``)."""
        try:
            report = apply_parameter_freezing(model, self.config, strict=self.strict)
        except ValueError as exc:
            raise MisconfigurationException(f"ParameterFreezing: {exc}") from exc
        if self.surgery_runs == 0:
            for note in report.notes:
                rank_zero_warn(f"ParameterFreezing: {note}")
        return report.frozen

    @override
    def reset_run_state(self) -> None:
        super().reset_run_state()
        self._model: nn.Module | None = None

    @override
    def apply_surgery(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module) -> None:
        self._model = model
        self.frozen = self.freeze(model)
        # A resume may still change the set (sharded: after on_fit_start): the count is said at train start or fit end
        self._count_pending = trainer.state.fn == "fit"
        if not self._count_pending:
            self.log_first(f"froze {len(self.frozen)} parameter tensors.")

    def _say_count(self, trainer: pl.Trainer) -> None:
        if self._count_pending:
            self._count_pending = False
            restored = " (after restoring the checkpoint)" if trainer.ckpt_path else ""
            log.info(f"ParameterFreezing: froze {len(self.frozen)} parameter tensors{restored}.")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._say_count(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._say_count(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        # The model's whole frozen set at save time, whatever froze it: that is what a resume must reproduce.
        names = frozen_names(self._model) if self._model is not None else sorted(self.frozen)
        return {"frozen": names, "digest": digest_names(names)}

    @override
    def around_checkpoint_load(self, trainer: pl.Trainer, checkpoint_path: Any, load: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if trainer.state.fn != "fit":
            return load()  # validate/test load weights only: what trains does not matter
        prefix, model = find_hf_model(trainer.lightning_module)
        if trainer.strategy.restore_checkpoint_after_setup:
            # Sharded strategies load the optimizer state in `load`: reconcile first, rebuild the stateless optimizers.
            state = saved_state(read_callback_states(checkpoint_path) or {}, self.state_key)
            if state is not None:
                diff = frozen_set_diff(model, state.get("frozen", []))
                with_state = names_with_optimizer_state(checkpoint_path, prefix) if diff.to_unfreeze else None
                if self._resolve(model, self._keep_stateless_frozen(diff, with_state), checkpoint_path) and trainer.strategy.optimizers:
                    trainer.strategy.setup_optimizers(trainer)
                    log.info("Rebuilt the optimizers for the checkpoint's frozen set before loading their state.")
            return load()
        # One device and DDP: `load` only reads the file; the weights, then the optimizer built later, load from it.
        checkpoint = load()
        state = saved_state(checkpoint.get("callbacks", {}), self.state_key)
        if state is None:
            return checkpoint
        saved_frozen = set(state.get("frozen", []))
        diff = frozen_set_diff(model, saved_frozen)
        names = _saved_optimizer_names(checkpoint, model, saved_frozen) if diff.to_unfreeze else None
        with_state = None if names is None else {
            by_position[i] for state, by_position in zip(checkpoint["optimizer_states"], names) for i in state.get("state", {}) if i in by_position
        }
        kept = self._keep_stateless_frozen(diff, with_state)
        # What stays frozen leaves the saved groups (in place): the optimizer built next holds the rest, in order.
        drop = set(diff.to_unfreeze) - set(kept.to_unfreeze)
        for state, by_position in zip(checkpoint["optimizer_states"], names) if drop else ():
            for group in state.get("param_groups", []):
                group["params"] = [i for i in group["params"] if by_position.get(i) not in drop]
            for i in [i for i in state.get("state", {}) if by_position.get(i) in drop]:
                del state["state"][i]
        self._resolve(model, kept, checkpoint_path)
        return checkpoint

    def _keep_stateless_frozen(self, diff: FrozenSetDiff, with_state: set[str] | None) -> FrozenSetDiff:
        """What the checkpoint trained but never stepped (no optimizer state) stays frozen: it never changed."""
        stateless = [name for name in diff.to_unfreeze if with_state is not None and name not in with_state]
        if not stateless:
            return diff
        log.info(
            f"ParameterFreezing: keeping {len(stateless)} parameters frozen that the checkpoint trained but never "
            f"stepped (it has no optimizer state for them): {preview(stateless)}."
        )
        return FrozenSetDiff(to_freeze=diff.to_freeze, to_unfreeze=[n for n in diff.to_unfreeze if n not in stateless], missing=diff.missing)

    def _resolve(self, model: nn.Module, diff: FrozenSetDiff, checkpoint_path: Any) -> bool:
        if diff.missing:
            rank_zero_warn(f"ParameterFreezing: the checkpoint froze parameters this model does not have: {preview(diff.missing)}.")
        if not diff:
            return False
        if self.on_resume_mismatch == "error":
            raise MisconfigurationException(
                f"ParameterFreezing: the checkpoint {checkpoint_path} was trained with a different frozen set: "
                f"{diff.describe()}. Its optimizer state fits only its own set. Resume with the checkpoint's freeze "
                "configuration, set on_resume_mismatch='restore' to re-apply its set, or start a new fit from its "
                "weights (no ckpt_path) to train the new set."
            )
        apply_frozen_set(model, diff)
        for name in diff.to_unfreeze:
            self.frozen.pop(name, None)
        self.frozen.update(dict.fromkeys(diff.to_freeze, _CHECKPOINT_RULE))
        rank_zero_warn(
            f"ParameterFreezing: this freeze configuration differs from the checkpoint {checkpoint_path}: "
            f"{diff.describe()}. Re-applying the checkpoint's frozen set so the run resumes exactly "
            "(on_resume_mismatch='restore'; 'error' stops instead). To train the new set, start a new fit from "
            "the checkpoint's weights (no ckpt_path)."
        )
        return True
