"""Bytes per rank for parameters, gradients and optimizer state under FSDP2.

Meta-safe: it reads shapes and dtypes only, so a 70B plan costs no memory. FSDP2 shards each
parameter on dim 0 with padding, so a rank holds ``ceil(dim0 / world) * rest`` elements. Gradients
and optimizer state exist only for trainable parameters (that is what freezing saves).

:func:`estimate_training_memory` counts the resident sharded state only. :func:`estimate_fsdp2_peak`
adds what FSDP2 holds unsharded while it runs (all-gathered groups, gradients being reduced), per
group of :func:`~lightning_automodel.core.fsdp_layout.fsdp2_groups`, and splits device from host
memory under CPU offload. Activations are never included (they depend on batch, sequence length and
activation checkpointing, not on the layout).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_automodel.core.fsdp_layout import KEPT_UNSHARDED_GROUPS, ROOT_GROUP, fsdp2_groups
from lightning_automodel.core.naming import unique_named_parameters
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
    optimizer_state_dtype: torch.dtype | None = torch.float32,
    optimizer_states_per_param: int = 2,
    sharded: bool = True,
) -> TrainingMemoryEstimate:
    """Estimate per-rank bytes for a training run.

    Args:
        world_size: ranks the parameters are sharded over (FSDP2 data-parallel size).
        param_dtype: storage dtype of the parameters; ``None`` keeps each parameter's own dtype.
        grad_dtype: gradient dtype; ``None`` means the parameter's storage dtype.
        optimizer_state_dtype: dtype of each optimizer state tensor; ``None`` means the parameter's
            storage dtype (what ``torch.optim.AdamW`` allocates: ``zeros_like(param)``).
        optimizer_states_per_param: state tensors per trainable parameter (AdamW: 2).
        sharded: False for DDP (everything replicated).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}.")
    if optimizer_states_per_param < 0:
        raise ValueError(f"optimizer_states_per_param must be >= 0 (AdamW: 2, SGD: 0); got {optimizer_states_per_param}.")
    param_bytes = grad_bytes = optimizer_bytes = 0.0
    for _, p in unique_named_parameters(model):  # each parameter once: tied weights are stored once
        local = _local_numel(p, world_size, sharded)
        per_elem = param_dtype.itemsize if param_dtype is not None else _physical_bytes_per_element(p)
        param_bytes += local * per_elem
        if p.requires_grad:
            grad_size = grad_dtype.itemsize if grad_dtype is not None else per_elem
            grad_bytes += local * grad_size
            state_size = optimizer_state_dtype.itemsize if optimizer_state_dtype is not None else per_elem
            optimizer_bytes += local * state_size * optimizer_states_per_param
    return TrainingMemoryEstimate(world_size, int(param_bytes), int(grad_bytes), int(optimizer_bytes))


@dataclass(frozen=True)
class FSDP2MemoryEstimate:
    """Peak bytes one rank holds under FSDP2 in a given layout (all fields per rank, activations excluded).

    With ``cpu_offload`` the sharded state lives in host memory and the device holds only what is in flight.

    Attributes:
        world_size: data-parallel ranks the state is sharded over.
        cpu_offload: whether the sharded state lives in host memory (FSDP2 ``CPUOffloadPolicy``).
        param_bytes: sharded parameters.
        grad_bytes: sharded gradients (trainable parameters only; FSDP2 keeps them in the parameter dtype).
        optimizer_bytes: sharded optimizer state (trainable parameters only).
        gather_bytes: all-gathered parameters in flight at the peak: the two largest resharded groups
            (FSDP2 prefetches the next while one computes) plus every group kept unsharded.
        reduce_bytes: the largest trainable group's unsharded gradients (compute dtype) plus its
            reduce-scatter buffer (reduce dtype).
        prefetched_groups: the (at most two) largest resharded groups counted in ``gather_bytes``.
        kept_groups: the non-empty groups kept unsharded, counted in ``gather_bytes``.
        reduced_group: the trainable group counted in ``reduce_bytes`` (None when nothing trains).
        sharded_bytes: ``param_bytes + grad_bytes + optimizer_bytes``.
        in_flight_bytes: ``gather_bytes + reduce_bytes``.
        total_bytes: ``sharded_bytes + in_flight_bytes`` (device plus host).
        device_bytes: accelerator memory at the peak.
        host_bytes: host memory for the offloaded state (0 without offload).
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
    model: nn.Module,
    *,
    world_size: int,
    groups: Sequence[tuple[str, Sequence[str]]] | None = None,
    compute_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    optimizer_state_dtype: torch.dtype | None = None,
    optimizer_states_per_param: int = 2,
    cpu_offload: bool = False,
    keep_unsharded: Collection[str] = KEPT_UNSHARDED_GROUPS,
) -> FSDP2MemoryEstimate:
    """Per-rank peak memory of FSDP2 training in the layout ``groups`` (meta-safe: shapes and dtypes only).

    Sharded state is counted like :func:`estimate_training_memory` (dim 0 padded to a multiple of the
    world size). The all-gather of a group materializes every rank's padded shard, so a group's
    unsharded size is ``ceil(dim0 / world) * world * rest`` elements per parameter, in
    ``compute_dtype`` for floating-point parameters (the ``MixedPrecisionPolicy`` param dtype) or in
    the stored dtype. The two largest resharded groups are counted rather than the largest twice: the
    prefetched group is a different group, and with an untied 128k vocabulary the embedding is much
    larger than a decoder layer, so doubling it would overstate the peak.

    Args:
        world_size: data-parallel ranks (the FSDP2 shard dimension).
        groups: ``(group name, canonical parameter names)`` as returned by
            :func:`~lightning_automodel.core.fsdp_layout.fsdp2_groups` (the default). Parameters no
            group names go to the root group, as ``fully_shard(model)`` would take them.
        compute_dtype: dtype of the all-gathered copies (bf16 mixed precision); ``None``: each
            parameter's own dtype.
        reduce_dtype: dtype gradients are reduce-scattered in; ``None``: the compute dtype.
        optimizer_state_dtype: ``None`` follows each parameter's dtype, as AdamW's ``zeros_like`` does.
        optimizer_states_per_param: AdamW 2, SGD with momentum 1.
        cpu_offload: sharded state in host memory (FSDP2 ``CPUOffloadPolicy``).
        keep_unsharded: group names kept unsharded between forward and backward
            (``reshard_after_forward=False``): the norm+head group and the root.

    Raises:
        ValueError: ``world_size < 1``, a negative state count, or a group naming an unknown parameter.
    """
    # The resident sharded state is exactly the plain estimate's (same padding, same dtypes; it also
    # validates world_size and the state count); only the in-flight part depends on the groups.
    state = estimate_training_memory(
        model,
        world_size=world_size,
        optimizer_state_dtype=optimizer_state_dtype,
        optimizer_states_per_param=optimizer_states_per_param,
        sharded=True,
    )
    params = dict(unique_named_parameters(model))
    groups = fsdp2_groups(model) if groups is None else groups
    owner: dict[str, str] = {}
    order: dict[str, None] = {}  # groups in first-seen order; a list's `in` made this quadratic in the layers
    for group, names in groups:
        order.setdefault(group)
        for name in names:
            if name not in params:
                raise ValueError(f"FSDP2 group {group!r} names {name!r}, which is not a parameter of {type(model).__name__}.")
            owner.setdefault(name, group)
    order.setdefault(ROOT_GROUP)
    gathers = dict.fromkeys(order, 0.0)
    reduces = dict.fromkeys(order, 0.0)
    for name, p in params.items():
        local = _local_numel(p, world_size, True)
        gathered = compute_dtype.itemsize if compute_dtype is not None and p.is_floating_point() else _physical_bytes_per_element(p)
        group = owner.get(name, ROOT_GROUP)
        gathers[group] += local * world_size * gathered
        if p.requires_grad:
            reduce_size = reduce_dtype.itemsize if reduce_dtype is not None else gathered
            reduces[group] += local * world_size * (gathered + reduce_size)
    kept = [g for g in order if g in keep_unsharded and gathers[g] > 0]
    resharded = sorted((g for g in order if g not in keep_unsharded and gathers[g] > 0), key=lambda g: -gathers[g])
    prefetched = resharded[:2]
    gather = sum(gathers[g] for g in prefetched) + sum(gathers[g] for g in kept)
    reduced = max((g for g in order if reduces[g] > 0), key=reduces.__getitem__, default=None)
    return FSDP2MemoryEstimate(
        world_size=world_size,
        cpu_offload=cpu_offload,
        param_bytes=state.param_bytes,
        grad_bytes=state.grad_bytes,
        optimizer_bytes=state.optimizer_bytes,
        gather_bytes=int(gather),
        reduce_bytes=int(reduces[reduced]) if reduced is not None else 0,
        prefetched_groups=tuple(prefetched),
        kept_groups=tuple(kept),
        reduced_group=reduced,
    )


def four_bit_weight_bytes(numel: int, *, blocksize: int = 64, double_quant: bool = False) -> int:
    """Bytes bitsandbytes holds for one 4-bit (nf4/fp4) weight of ``numel`` elements.

    Two values per byte, plus one absmax per ``blocksize`` block: fp32, or with double quantization one
    byte each plus an fp32 absmax per 256 blocks and one offset.
    """
    blocks = -(-numel // blocksize)
    absmax = blocks + (-(-blocks // 256)) * 4 + 4 if double_quant else blocks * 4
    return (numel + 1) // 2 + absmax
