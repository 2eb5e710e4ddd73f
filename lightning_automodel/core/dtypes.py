"""Dtype names, and casting to one dtype: FSDP2 fails at the first forward (``FSDP expects uniform original
parameter dtype``) on fp32 adapters (Phi-4-multimodal). The cast goes tensor by tensor (peak memory near one
tensor), keeps every ``Parameter`` object (optimizers, tied aliases) and works after ``fully_shard``."""
from __future__ import annotations

import logging

import torch
from torch import nn

from lightning_automodel._compat.torch import apply_to_tensors
from lightning_automodel.core.naming import canonical_name

logger = logging.getLogger(__name__)

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp64": torch.float64, "float64": torch.float64,
}
#: the dtypes a Hugging Face export writes; "auto" keeps each tensor's own dtype
EXPORT_DTYPE_NAMES: tuple[str, ...] = ("auto", "bf16", "bfloat16", "fp32", "float32")


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` / ``"torch.bfloat16"`` -> ``torch.bfloat16`` (YAML takes names, not dtypes)."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"Unknown dtype {name!r}; use one of {sorted(_DTYPE_NAMES)}.")
    return _DTYPE_NAMES[key]


def export_dtype(name: str) -> torch.dtype | None:
    """``"auto"`` -> ``None`` (each tensor keeps its dtype), ``"bf16"`` / ``"fp32"`` (or the long names) -> the dtype."""
    if name not in EXPORT_DTYPE_NAMES:
        raise ValueError(f"must be one of auto, bf16, fp32; got {name!r}.")
    return None if name == "auto" else _DTYPE_NAMES[name]


def cast_floating_point(
    model: nn.Module, dtype: torch.dtype = torch.bfloat16, *,
    source_dtypes: tuple[torch.dtype, ...] = (torch.float32,), cast_buffers: bool = False,
) -> list[str]:
    """Cast ``source_dtypes`` parameters (and grads; buffers optionally: RoPE ``inv_freq`` loses precision in bf16)
    to ``dtype`` in place; returns their canonical names."""
    if not dtype.is_floating_point:
        raise ValueError(f"Can only cast to a floating-point dtype; got {dtype}.")
    named = list(model.named_parameters(remove_duplicate=False))
    if cast_buffers:
        named += list(model.named_buffers(remove_duplicate=False))
    targets: dict[int, str] = {}  # id -> canonical name, each tensor once (tied weights under their first name)
    for name, t in named:
        if t is not None and t.dtype in source_dtypes and t.dtype != dtype:
            targets.setdefault(id(t), canonical_name(name))
    if not targets:
        return []
    target_ids = set(targets) | {id(p.grad) for p in model.parameters() if id(p) in targets and p.grad is not None}
    converted: dict[int, torch.Tensor] = {}

    def convert(t: torch.Tensor) -> torch.Tensor:
        # _apply visits a shared tensor once per owning module: hand each owner the same converted tensor.
        if id(t) not in target_ids:
            return t
        if id(t) not in converted:
            converted[id(t)] = t.to(dtype)
        return converted[id(t)]

    with torch.no_grad():  # one tensor at a time, Parameter objects kept (see the module docstring)
        apply_to_tensors(model, convert)
    logger.debug("Cast %d tensors to %s.", len(targets), dtype)  # the callback says it, once per job
    return list(targets.values())
