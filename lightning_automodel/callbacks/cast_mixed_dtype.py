"""Cast fp32 parameters to bf16 so FSDP2 accepts a mixed-dtype model."""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_automodel.callbacks._lifecycle import ModelSurgeryCallback
from lightning_automodel.core.dtypes import cast_floating_point


class CastMixedDtypeToBF16(ModelSurgeryCallback):
    """Cast every fp32 parameter (and optionally buffer) of the model to bf16, in place.

    FSDP2 fails at the first forward with ``FSDP expects uniform original parameter dtype`` otherwise.
    Runs before sharding, or after ``configure_model`` (FSDP1 flat parameters cannot be cast: an error).

    Args:
        cast_buffers: cast fp32 buffers too (RoPE ``inv_freq`` loses precision in bf16; off by default).
    """

    surgery_order: ClassVar[int] = 30

    def __init__(self, cast_buffers: bool = False) -> None:
        super().__init__()
        self.cast_buffers = cast_buffers

    @override
    def reset_run_state(self) -> None:
        super().reset_run_state()
        self.cast: list[str] = []

    @override
    def apply_surgery(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            raise MisconfigurationException(
                "CastMixedDtypeToBF16 cannot cast FSDP1 flat parameters after wrapping. Build the model unwrapped "
                "(FSDPStrategy wraps it after this callback runs) or use ModelParallelStrategy (FSDP2)."
            )
        cast = cast_floating_point(model, torch.bfloat16, cast_buffers=self.cast_buffers)
        if cast:
            self.cast = sorted(set(self.cast) | set(cast))
            self.log_first(f"cast {len(cast)} tensors to bfloat16.")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"cast": list(self.cast)}
