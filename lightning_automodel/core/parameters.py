"""Parameter counts and norms right for quantized, sharded and meta models: a ``Params4bit`` counts
``quant_state.shape`` (reference #1290: 8B QLoRA reported 2.8B); DTensor norms are summed over ranks."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from lightning_automodel.core.distributed import all_reduce_sum_, get_world_size_safe, is_distributed, local_tensor
from lightning_automodel.core.naming import unique_named_parameters


def logical_numel(param: torch.Tensor) -> int:
    """``quant_state.shape``'s size for a quantized ``Params4bit``, else ``numel()``."""
    bnb = sys.modules.get("bitsandbytes")  # only a model that imported bitsandbytes can hold its tensors
    if bnb is not None and isinstance(param, bnb.nn.Params4bit) and getattr(param, "quant_state", None) is not None:
        return math.prod(param.quant_state.shape)
    return param.numel()


class ParameterCounts(NamedTuple):
    """Logical element counts, in the reference's ``(trainable, total)`` order so it unpacks the same."""

    trainable: int
    total: int


def count_parameters(model: nn.Module) -> ParameterCounts:
    """``(trainable, total)`` logical element counts; safe on meta models; tied weights once."""
    trainable = total = 0
    for _, p in unique_named_parameters(model):
        n = logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    return ParameterCounts(trainable, total)


@dataclass(frozen=True)
class ParameterStats:
    """Logical counts and the global L2 norm (``nan`` when not computed or on meta)."""

    total: int
    trainable: int
    l2_norm: float


def _replication_factor(p: torch.Tensor, world_size: int) -> int:
    """How many ranks hold each element of ``p`` (to count a replicated value once in a global sum)."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(p, DTensor):
        return world_size
    mesh = p.device_mesh
    factor = max(world_size // max(mesh.size(), 1), 1)
    for dim, placement in enumerate(p.placements):
        if isinstance(placement, Replicate):
            factor *= mesh.size(dim)
    return factor


@torch.no_grad()
def global_squared_l2_norm(model: nn.Module, *, device: torch.device | None = None) -> float:
    """Sum of squares of floating-point parameters over every rank (one all-reduce), ``nan`` on meta. Assumes
    every rank holds the same parameters up to sharding and replication (FSDP2, HSDP, TP, DDP; not pipelines)."""
    world = get_world_size_safe() if is_distributed() else 1
    local_device = None
    total = None
    for p in model.parameters():  # tied weights once
        if not (p.is_floating_point() or p.is_complex()):
            continue  # packed quantized bytes: a norm of those is meaningless
        local = local_tensor(p)
        if local.is_meta:
            return float("nan")
        local = local.detach()
        if local.is_complex():
            local = local.abs()
        # accumulate in float64 without materializing a float64 copy of the tensor
        sq = torch.linalg.vector_norm(local, 2, dtype=torch.float64).square() / _replication_factor(p, world)
        local_device = sq.device
        total = sq if total is None else total + sq.to(total.device)
    if total is None:
        total = torch.zeros((), dtype=torch.float64, device=local_device)
    all_reduce_sum_(total, device=device)
    return max(total.item(), 0.0)


def parameter_stats(model: nn.Module, *, norm: bool = True, device: torch.device | None = None) -> ParameterStats:
    """Total and trainable logical counts and (optionally) the global L2 norm (all-reduced on ``device``)."""
    counts = count_parameters(model)
    l2_norm = math.sqrt(global_squared_l2_norm(model, device=device)) if norm else float("nan")
    return ParameterStats(counts.total, counts.trainable, l2_norm)


@dataclass
class ModuleRow:
    """One row of a per-module breakdown."""

    name: str
    total: int = 0
    trainable: int = 0
    frozen_by: dict[str, int] = field(default_factory=dict)


def module_breakdown(
    model: nn.Module, *, depth: int = 2, frozen_by: Mapping[str, str] | None = None
) -> list[ModuleRow]:
    """Parameters by their first ``depth`` name components; frozen ones by ``frozen_by`` rule or "already frozen"."""
    rows: dict[str, ModuleRow] = {}
    for name, p in unique_named_parameters(model):
        parts = name.split(".", depth)  # at most depth + 1 pieces: the key, then the rest
        key = ".".join(parts[: min(depth, len(parts) - 1)]) if len(parts) > 1 else name
        row = rows.setdefault(key, ModuleRow(key))
        n = logical_numel(p)
        row.total += n
        if p.requires_grad:
            row.trainable += n
        else:
            rule = (frozen_by or {}).get(name, "already frozen")
            row.frozen_by[rule] = row.frozen_by.get(rule, 0) + n
    return list(rows.values())
