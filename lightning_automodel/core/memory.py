"""Bytes per rank for parameters, gradients and optimizer state under FSDP2 (meta-safe; activations excluded)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_automodel.core.fsdp_layout import KEPT_UNSHARDED_GROUPS, ROOT_GROUP, fsdp2_groups
from lightning_automodel.core.naming import unique_named_parameters
from lightning_automodel.core.parameters import logical_numel

#: AdamW's state tensors per trainable parameter (``exp_avg``, ``exp_avg_sq``).
ADAMW_STATES = 2


@dataclass(frozen=True)
class TrainingMemoryEstimate:
    """Bytes one rank holds for the resident training state; ``total_bytes`` is a field (``asdict`` has it)."""

    world_size: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    total_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total_bytes", self.param_bytes + self.grad_bytes + self.optimizer_bytes)


def _local_numel(p: torch.Tensor, world_size: int, sharded: bool) -> int:
    """Elements of ``p`` on one rank (a DTensor's shape is global; packed 4-bit tensors split evenly)."""
    numel = logical_numel(p)
    if not sharded or world_size <= 1:
        return numel
    if numel != p.numel() or not p.shape:
        return math.ceil(numel / world_size)
    return math.ceil(p.shape[0] / world_size) * math.prod(p.shape[1:])


def _bytes_per_element(p: torch.Tensor) -> float:
    logical = logical_numel(p)  # Params4bit: physical bytes over logical elements (0.5 for nf4)
    return (p.numel() * p.element_size()) / logical if logical else float(p.element_size())


def estimate_training_memory(
    model: nn.Module, *, world_size: int = 1, optimizer_state_dtype: torch.dtype | None = torch.float32, sharded: bool = True
) -> TrainingMemoryEstimate:
    """Per-rank bytes of parameters, gradients (parameter dtype) and AdamW state (``optimizer_state_dtype``;
    None: the parameter's dtype, as AdamW's ``zeros_like``); ``sharded=False`` for DDP (all replicated)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}.")
    param_bytes = grad_bytes = optimizer_bytes = 0.0
    for _, p in unique_named_parameters(model):  # tied weights are stored once
        local = _local_numel(p, world_size, sharded)
        per_elem = _bytes_per_element(p)
        param_bytes += local * per_elem
        if p.requires_grad:
            grad_bytes += local * per_elem
            state_size = optimizer_state_dtype.itemsize if optimizer_state_dtype is not None else per_elem
            optimizer_bytes += local * state_size * ADAMW_STATES
    return TrainingMemoryEstimate(world_size, int(param_bytes), int(grad_bytes), int(optimizer_bytes))


@dataclass(frozen=True)
class FSDP2MemoryEstimate:
    """Peak bytes one rank holds under FSDP2 in a given layout (activations excluded).

    ``gather_bytes``: the two largest resharded groups (one prefetched while one computes) plus ``kept_groups``.
    ``reduce_bytes``: the largest trainable group's gradients and reduce-scatter buffer. ``cpu_offload``: the
    sharded state is host memory, the device holds only what is in flight.
    """

    world_size: int
    cpu_offload: bool
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    gather_bytes: int
    reduce_bytes: int
    prefetched_groups: tuple[str, ...] = ()
    kept_groups: tuple[str, ...] = ()
    reduced_group: str | None = None
    sharded_bytes: int = field(init=False)
    in_flight_bytes: int = field(init=False)
    total_bytes: int = field(init=False)
    device_bytes: int = field(init=False)
    host_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        sharded = self.param_bytes + self.grad_bytes + self.optimizer_bytes
        in_flight = self.gather_bytes + self.reduce_bytes
        object.__setattr__(self, "sharded_bytes", sharded)
        object.__setattr__(self, "in_flight_bytes", in_flight)
        object.__setattr__(self, "total_bytes", sharded + in_flight)
        object.__setattr__(self, "device_bytes", in_flight if self.cpu_offload else sharded + in_flight)
        object.__setattr__(self, "host_bytes", sharded if self.cpu_offload else 0)


def estimate_fsdp2_peak(
    model: nn.Module, *, world_size: int, groups: Sequence[tuple[str, Sequence[str]]] | None = None,
    compute_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None,
    optimizer_state_dtype: torch.dtype | None = None, cpu_offload: bool = False,
) -> FSDP2MemoryEstimate:
    """Per-rank peak of FSDP2 training in the layout ``groups`` (default :func:`fsdp2_groups`, the rest: root). The two
    largest resharded groups count, not the largest twice: an untied 128k-vocabulary embedding dwarfs a layer."""
    state = estimate_training_memory(model, world_size=world_size, optimizer_state_dtype=optimizer_state_dtype)
    params = dict(unique_named_parameters(model))
    owner: dict[str, str] = {}
    order: dict[str, None] = {}  # groups in first-seen order (a list's `in` was quadratic in the layers)
    for group, names in fsdp2_groups(model) if groups is None else groups:
        order.setdefault(group)
        for name in names:
            if name not in params:
                raise ValueError(f"FSDP2 group {group!r} names {name!r}, which is not a parameter of {type(model).__name__}.")
            owner.setdefault(name, group)
    order.setdefault(ROOT_GROUP)
    gathers = dict.fromkeys(order, 0.0)
    reduces = dict.fromkeys(order, 0.0)
    for name, p in params.items():
        unsharded = _local_numel(p, world_size, True) * world_size
        gathered = compute_dtype.itemsize if compute_dtype is not None and p.is_floating_point() else _bytes_per_element(p)
        group = owner.get(name, ROOT_GROUP)
        gathers[group] += unsharded * gathered
        if p.requires_grad:
            reduces[group] += unsharded * (gathered + (reduce_dtype.itemsize if reduce_dtype is not None else gathered))
    kept = [g for g in order if g in KEPT_UNSHARDED_GROUPS and gathers[g] > 0]
    prefetched = sorted((g for g in order if g not in KEPT_UNSHARDED_GROUPS and gathers[g] > 0), key=lambda g: -gathers[g])[:2]
    reduced = max((g for g in order if reduces[g] > 0), key=reduces.__getitem__, default=None)
    return FSDP2MemoryEstimate(
        world_size=world_size,
        cpu_offload=cpu_offload,
        param_bytes=state.param_bytes,
        grad_bytes=state.grad_bytes,
        optimizer_bytes=state.optimizer_bytes,
        gather_bytes=int(sum(gathers[g] for g in (*prefetched, *kept))),
        reduce_bytes=int(reduces[reduced]) if reduced is not None else 0,
        prefetched_groups=tuple(prefetched),
        kept_groups=tuple(kept),
        reduced_group=reduced,
    )


def four_bit_weight_bytes(numel: int, *, blocksize: int = 64, double_quant: bool = False) -> int:
    """Bytes bitsandbytes holds for one 4-bit (nf4/fp4) weight: two values per byte plus one absmax per
    block (fp32, or with double quantization one byte each plus an fp32 absmax per 256 blocks and an offset)."""
    blocks = -(-numel // blocksize)
    absmax = blocks + (-(-blocks // 256)) * 4 + 4 if double_quant else blocks * 4
    return (numel + 1) // 2 + absmax
