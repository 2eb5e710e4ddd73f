"""Bytes per rank for parameters, gradients and optimizer state under FSDP2.

Meta-safe: it reads shapes and dtypes only, so a 70B plan costs no memory. FSDP2 shards each
parameter on dim 0 with padding, so a rank holds ``ceil(dim0 / world) * rest`` elements. Gradients
and optimizer state exist only for trainable parameters (that is what freezing saves). Transient
all-gather buffers and activations are not included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_automodel.core.parameters import logical_numel


@dataclass(frozen=True)
class TrainingMemoryEstimate:
    """Bytes one rank holds for training state (all fields per rank).

    Attributes:
        world_size: ranks the state is sharded over.
        param_bytes: resident parameter shards.
        grad_bytes: gradient shards (trainable parameters only).
        optimizer_bytes: optimizer state (trainable parameters only).
        total_bytes: the sum of the three (a field, so ``dataclasses.asdict`` includes it).
    """

    world_size: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total_bytes", self.param_bytes + self.grad_bytes + self.optimizer_bytes)


def _local_numel(p: torch.Tensor, world_size: int, sharded: bool) -> int:
    """Elements of ``p`` on one rank: FSDP2 shards dim 0 and pads it to a multiple of the world size.

    A ``DTensor``'s shape is already global, so an already-sharded model is estimated like the
    unsharded one. Packed 4-bit tensors are flat, so their logical elements are split evenly.
    """
    numel = logical_numel(p)
    if not sharded or world_size <= 1:
        return numel
    shape = tuple(p.shape)
    if numel != p.numel() or not shape:
        return math.ceil(numel / world_size)
    return math.ceil(shape[0] / world_size) * math.prod(shape[1:])


def _physical_bytes_per_element(p: torch.Tensor) -> float:
    # Params4bit: physical bytes over logical elements (0.5 for nf4).
    logical = logical_numel(p)
    return (p.numel() * p.element_size()) / logical if logical else float(p.element_size())


def estimate_training_memory(
    model: nn.Module,
    *,
    world_size: int = 1,
    param_dtype: torch.dtype | None = None,
    grad_dtype: torch.dtype | None = None,
    optimizer_state_dtype: torch.dtype = torch.float32,
    optimizer_states_per_param: int = 2,
    sharded: bool = True,
) -> TrainingMemoryEstimate:
    """Estimate per-rank bytes for a training run.

    Args:
        world_size: ranks the parameters are sharded over (FSDP2 data-parallel size).
        param_dtype: storage dtype of the parameters; ``None`` keeps each parameter's own dtype.
        grad_dtype: gradient dtype; ``None`` means the parameter's storage dtype.
        optimizer_state_dtype: dtype of each optimizer state tensor (AdamW: fp32).
        optimizer_states_per_param: state tensors per trainable parameter (AdamW: 2).
        sharded: False for DDP (everything replicated).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}.")
    if optimizer_states_per_param < 0:
        raise ValueError(f"optimizer_states_per_param must be >= 0 (AdamW: 2, SGD: 0); got {optimizer_states_per_param}.")
    param_bytes = grad_bytes = optimizer_bytes = 0.0
    state_size = optimizer_state_dtype.itemsize
    for p in model.parameters():  # each parameter once: tied weights are stored once
        local = _local_numel(p, world_size, sharded)
        per_elem = param_dtype.itemsize if param_dtype is not None else _physical_bytes_per_element(p)
        param_bytes += local * per_elem
        if p.requires_grad:
            grad_size = grad_dtype.itemsize if grad_dtype is not None else per_elem
            grad_bytes += local * grad_size
            optimizer_bytes += local * state_size * optimizer_states_per_param
    return TrainingMemoryEstimate(world_size, int(param_bytes), int(grad_bytes), int(optimizer_bytes))
