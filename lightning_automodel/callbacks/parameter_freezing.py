"""Freeze parameters by configuration, before the optimizer ever sees them."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_automodel.callbacks._lifecycle import ModelSurgeryCallback, frozen_names, target_model
from lightning_automodel.callbacks._resume import (
    FrozenSetDiff,
    apply_frozen_set,
    frozen_set_diff,
    install_resume_check,
    preview,
    saved_state,
)
from lightning_automodel.core.distributed import digest_names
from lightning_automodel.core.freezing import FreezeConfig, apply_parameter_freezing, parse_freeze_config

log = logging.getLogger(__name__)

ResumeMismatchPolicy = Literal["restore", "error"]
_CHECKPOINT_RULE = "checkpoint's frozen set"


class ParameterFreezing(ModelSurgeryCallback):
    """Freeze towers and modules of the Hugging Face model by config (NeMo AutoModel's freeze config).

    Selectors are ``{path: ...}`` (exact) or ``{glob: ...}`` (``*`` crosses dots) over module paths
    relative to the Hugging Face model (``model.vision_tower``, ``lm_head``). ``unfreeze_modules``
    wins over ``freeze_modules``. ``freeze_vision_tower=None`` freezes the vision tower only when no
    selector list is given (the reference's default).

    Args:
        freeze_vision_tower: freeze vision modules (``None``: only when no selectors are given).
        freeze_audio_tower: freeze audio modules.
        freeze_language_model: freeze the language model.
        freeze_video_embedder: freeze ``patch_generator.video_embedder`` (unused on image-only data).
        freeze_modules: selectors of modules to freeze.
        unfreeze_modules: selectors of modules to keep trainable (wins on overlap).
        strict: a selector that matches no parameter is an error.
        on_resume_mismatch: what a resume (``ckpt_path``) does when the checkpoint was trained with a
            different frozen set than this configuration gives. ``"restore"`` (default) re-applies the
            checkpoint's set with a warning naming the parameters, so the run continues exactly as it
            was; ``"error"`` stops with an error naming them. Either way this happens before any
            optimizer state is loaded, on every strategy. To train a new set from a checkpoint, start a
            new fit from its weights instead of resuming.

    One ``ParameterFreezing`` per Trainer: its ``state_key`` does not depend on the configuration, so
    a resume finds the checkpoint's frozen set whatever the configuration is now.

    Example (YAML)::

        trainer:
          callbacks:
            - class_path: lightning_automodel.callbacks.ParameterFreezing
              init_args:
                freeze_modules: [{glob: "model.vision_tower.*"}]
                unfreeze_modules: [{path: "model.vision_tower.post_layernorm"}]
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
        try:
            self.config: FreezeConfig = parse_freeze_config(raw)
        except (TypeError, ValueError) as exc:
            raise MisconfigurationException(f"ParameterFreezing: {exc}") from exc
        self.strict = strict
        self.on_resume_mismatch = on_resume_mismatch
        self.frozen: dict[str, str] = {}
        self._model: nn.Module | None = None

    @classmethod
    def from_config(
        cls, freeze_config: Mapping[str, Any], strict: bool = True, on_resume_mismatch: ResumeMismatchPolicy = "restore"
    ) -> ParameterFreezing:
        """Build from a reference-style ``freeze_config`` mapping (validated, unknown keys rejected)."""
        try:
            config = parse_freeze_config(freeze_config)
        except (TypeError, ValueError) as exc:
            raise MisconfigurationException(f"ParameterFreezing: {exc}") from exc
        return cls(
            freeze_vision_tower=config.freeze_vision_tower,
            freeze_audio_tower=config.freeze_audio_tower,
            freeze_language_model=config.freeze_language_model,
            freeze_video_embedder=config.freeze_video_embedder,
            freeze_modules=[{"path": s.path} if s.path else {"glob": s.glob} for s in config.freeze_modules or ()],
            unfreeze_modules=[{"path": s.path} if s.path else {"glob": s.glob} for s in config.unfreeze_modules or ()],
            strict=strict,
            on_resume_mismatch=on_resume_mismatch,
        )

    @property
    @override
    def state_key(self) -> str:
        # Stable on purpose: a resume with a changed configuration must still find the saved frozen set.
        return type(self).__qualname__

    def freeze(self, model: nn.Module) -> dict[str, str]:
        """Apply the configured freeze to a model (also used by ``lightning-automodel plan``)."""
        try:
            report = apply_parameter_freezing(model, self.config, strict=self.strict)
        except ValueError as exc:
            raise MisconfigurationException(f"ParameterFreezing: {exc}") from exc
        return report.frozen

    @override
    def reset_run_state(self) -> None:
        super().reset_run_state()
        self.frozen = {}
        self._model = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.strategy.restore_checkpoint_after_setup:
            install_resume_check(trainer.strategy)

    @override
    def apply_surgery(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module) -> None:
        self._model = model
        self.frozen = self.freeze(model)
        if self.surgery_runs == 0:
            rank_zero_info(f"ParameterFreezing: froze {len(self.frozen)} parameter tensors.")

    @override
    def frozen_parameters(self) -> Mapping[str, str]:
        return self.frozen

    @override
    def state_dict(self) -> dict[str, Any]:
        # The model's whole frozen set at save time, whatever froze it: that is what a resume must reproduce.
        names = frozen_names(self._model) if self._model is not None else sorted(self.frozen)
        return {"frozen": names, "digest": digest_names(names)}

    def reconcile_with_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, callback_states: Mapping[str, Any], checkpoint_path: Any
    ) -> bool:
        """Before the optimizer state loads: compare with the checkpoint's frozen set and apply the policy.

        Returns True when the model's frozen set changed (the optimizers must be rebuilt).
        """
        state = saved_state(callback_states, self.state_key)
        if state is None:
            return False
        diff = frozen_set_diff(target_model(pl_module)[1], state.get("frozen", []))
        return self._resolve(target_model(pl_module)[1], diff, checkpoint_path)

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

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != "fit":
            return  # validate/test load weights only: what trains does not matter
        state = saved_state(checkpoint.get("callbacks", {}), self.state_key)
        if state is None:
            return
        model = target_model(pl_module)[1]
        diff = frozen_set_diff(model, state.get("frozen", []))
        if trainer.strategy.restore_checkpoint_after_setup:
            # The strategy wrapper reconciled before the optimizer state loaded; a difference now means it
            # could not (the strategy's load_checkpoint was replaced): the optimizer state may not fit.
            if diff:
                raise MisconfigurationException(
                    f"ParameterFreezing: the model's frozen set differs from the checkpoint {trainer.ckpt_path} after "
                    f"the optimizer state was loaded: {diff.describe()}. Resume with the checkpoint's freeze configuration."
                )
            return
        # Single device and DDP restore before configure_optimizers: reconciling here is in time.
        self._resolve(model, diff, trainer.ckpt_path)
