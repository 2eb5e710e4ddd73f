"""Freeze parameters by configuration, before the optimizer ever sees them."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from lightning_automodel.callbacks._lifecycle import ModelSurgeryCallback, coordinator_for, frozen_names, target_model
from lightning_automodel.callbacks._resume import reapply_frozen_set
from lightning_automodel.core.distributed import digest_names
from lightning_automodel.core.freezing import FreezeConfig, apply_parameter_freezing, parse_freeze_config

log = logging.getLogger(__name__)


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
    ) -> None:
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
        self.frozen: dict[str, str] = {}
        self._model: nn.Module | None = None

    @classmethod
    def from_config(cls, freeze_config: Mapping[str, Any], strict: bool = True) -> ParameterFreezing:
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
        )

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(config=repr(self.config))

    def freeze(self, model: nn.Module) -> dict[str, str]:
        """Apply the configured freeze to a model (also used by ``lightning-automodel plan``)."""
        try:
            report = apply_parameter_freezing(model, self.config, strict=self.strict)
        except ValueError as exc:
            raise MisconfigurationException(f"ParameterFreezing: {exc}") from exc
        return report.frozen

    @override
    def apply_surgery(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module) -> None:
        self._model = model
        self.frozen = self.freeze(model)
        coordinator_for(pl_module).frozen_by.update(self.frozen)
        if coordinator_for(pl_module).runs == 0:
            rank_zero_info(f"ParameterFreezing: froze {len(self.frozen)} parameter tensors.")

    @override
    def state_dict(self) -> dict[str, Any]:
        # The model's whole frozen set at save time, whatever froze it: that is what a resume must reproduce.
        names = frozen_names(self._model) if self._model is not None else sorted(self.frozen)
        return {"frozen": names, "digest": digest_names(names)}

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:
            return
        # Non-sharded strategies restore before configure_optimizers, sharded ones after; either way the
        # model exists now, so the checkpoint's set is re-applied here, exactly.
        reapply_frozen_set(trainer, target_model(pl_module)[1], set(state.get("frozen", [])), owner="ParameterFreezing")
