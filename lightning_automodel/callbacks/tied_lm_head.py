"""Keep a tied LM head tied: after building or sharding, and across checkpoint loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_automodel._compat.lightning import callback_state_key
from lightning_automodel.callbacks._tied_head_keys import checkpoint_keys, fill_missing_tied_head_prefixed, missing_tied_head_keys, tied_head_detached
from lightning_automodel.callbacks._lifecycle import ModelSurgeryCallback, patch_method, target_model
from lightning_automodel.core.tied_head import diagnose_tie, ensure_tied_lm_head
from lightning_automodel.core.logs import rank_zero_logger

log = rank_zero_logger(__name__)  # one line per job: rank 0's


def _head_from_embedding_in_state_dict(pl_module: pl.LightningModule, call_previous: Any, checkpoint: dict[str, Any]) -> Any:
    """``LightningModule.on_load_checkpoint`` patch: a full checkpoint without ``lm_head.weight`` gets it from the embedding."""
    state_dict = checkpoint.get("state_dict")
    if isinstance(state_dict, dict):
        prefix, model = target_model(pl_module)
        if fill_missing_tied_head_prefixed(state_dict, model, prefix):
            log.info("TiedLMHead: the checkpoint has no lm_head.weight; loaded it from the embedding.")
    return call_previous(checkpoint)


def _load_with_head_detached(strategy: Any, call_previous: Any, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``ModelParallelStrategy.load_checkpoint`` patch: a sharded checkpoint without the head loads it from the embedding."""
    prefix, model = target_model(strategy.lightning_module)
    keys = checkpoint_keys(Path(checkpoint_path))
    missing = missing_tied_head_keys(keys, model, prefix) if keys is not None else None
    if missing is None:
        return call_previous(checkpoint_path, *args, **kwargs)
    head, source = (key[len(f"state_dict.{prefix}"):] for key in missing)
    with tied_head_detached(model, head, source) as detached:
        if detached:
            log.info(f"TiedLMHead: {missing[0]} is not in the checkpoint; loading it from {missing[1]}.")
        return call_previous(checkpoint_path, *args, **kwargs)


class TiedLMHead(ModelSurgeryCallback):
    """Re-tie the LM head to the input embedding when the config says tied, and load checkpoints without it.

    * After the model is built or sharded (before the optimizer exists), a broken alias (meta init plus
      ``to_empty``, parameter replacement) is repaired, so the optimizer holds one tensor for both.
    * A checkpoint that omits ``lm_head.weight`` loads, a full ``.ckpt`` or a sharded DCP directory, on
      any strategy (``ModelParallelStrategy`` otherwise fails on the missing key before any hook runs).
    * After loading, the tie is verified.

    Args:
        strict: raise (instead of warning) when the config says tied but the storage cannot be aliased,
            e.g. because the head and the embedding differ in shape.
    """

    surgery_order: ClassVar[int] = 40

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.tied = False

    @property
    @override
    def state_key(self) -> str:
        return callback_state_key(self, strict=self.strict)

    def _tie(self, model: nn.Module, when: str) -> None:
        self.tied = ensure_tied_lm_head(model)
        status = diagnose_tie(model)
        if status.config_tied and not self.tied:
            message = f"TiedLMHead ({when}): the LM head cannot be tied: {status.reason}."
            if self.strict:
                raise MisconfigurationException(message)
            rank_zero_warn(message)

    @override
    def apply_surgery(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module) -> None:
        self._tie(model, "after build")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning.pytorch.strategies import ModelParallelStrategy

        super().setup(trainer, pl_module, stage)
        # Both patches are removed at teardown and on exception (ModelSurgeryCallback); see _lifecycle.
        patch_method(pl_module, "on_load_checkpoint", _head_from_embedding_in_state_dict)
        if isinstance(trainer.strategy, ModelParallelStrategy):
            patch_method(trainer.strategy, "load_checkpoint", _load_with_head_detached)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._tie(target_model(pl_module)[1], "after checkpoint load")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        _, model = target_model(pl_module)
        status = diagnose_tie(model)
        if status.config_tied and not status.locally_tied:
            rank_zero_warn(f"TiedLMHead: the LM head is not tied at train start: {status.reason}.")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"tied": self.tied}
