"""Drop-in for ``nemo_automodel.components.utils.model_utils``: same names, parameters and results.

Thin façade over :mod:`lightning_automodel.core`. Where behaviour differs from the reference it is
on purpose and documented in the core module (component-prefix freeze patterns, one-pass dead
parameter rules anchored on the text decoder, a global L2 norm, rank-0 logging).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_automodel.core.dead_params import (
    freeze_deepseek_v4_indexer_params as _freeze_deepseek_v4,
    freeze_minimax_m3_indexer_params as _freeze_minimax_m3,
    freeze_unused_kv_sharing_params as _freeze_kv_sharing,
)
from lightning_automodel.core.distributed import is_rank_0
from lightning_automodel.core.dtypes import cast_floating_point
from lightning_automodel.core.forward_signature import (
    VLM_INPUT_KEYS,
    filter_forward_kwargs,
    get_forward_signature as _get_forward_signature,
    supports_logits_to_keep as _supports_logits_to_keep,
    supports_seq_lens as _supports_seq_lens,
)
from lightning_automodel.core.freezing import (
    FreezeConfig,
    ModuleSelector,
    apply_parameter_freezing as _apply_parameter_freezing,
    freeze_module_by_attribute_and_patterns,
    parse_freeze_config,
)
from lightning_automodel.core.init import init_empty_weights, skip_random_init
from lightning_automodel.core.parameters import ParameterCounts, count_parameters, global_l2_norm, logical_numel
from lightning_automodel.core.thd import squeeze_input_for_thd
from lightning_automodel.core.tied_head import get_lm_head_module, get_lm_head_weight
from lightning_automodel.core.trust import resolve_trust_remote_code as _resolve_trust_remote_code
from lightning_automodel.core.vision import enable_radio_vit_fused_attn as _enable_radio

logger = logging.getLogger(__name__)

__all__ = [
    "VLM_INPUT_KEYS",
    "FreezeConfig",
    "ModuleSelector",
    "_freeze_module_by_attribute_and_patterns",
    "_get_forward_signature",
    "_get_logical_numel",
    "_get_model_param_stats",
    "_supports_logits_to_keep",
    "_supports_seq_lens",
    "apply_parameter_freezing",
    "cast_mixed_dtype_params_to_bf16",
    "count_model_parameters",
    "enable_radio_vit_fused_attn",
    "filter_forward_kwargs",
    "freeze_deepseek_v4_indexer_params",
    "freeze_minimax_m3_indexer_params",
    "freeze_unused_kv_sharing_params",
    "get_lm_head_module",
    "get_lm_head_weight",
    "init_empty_weights",
    "logger",
    "parse_freeze_config",
    "print_trainable_parameters",
    "resolve_trust_remote_code",
    "skip_random_init",
    "squeeze_input_for_thd",
]


def _get_logical_numel(param: torch.Tensor) -> int:
    return logical_numel(param)


def _get_model_param_stats(model: nn.Module) -> tuple[int, int, float]:
    """``(total, trainable, l2_norm)``; the norm is global across ranks (collective for DTensor models)."""
    counts = count_parameters(model)
    return counts.total, counts.trainable, global_l2_norm(model)


def count_model_parameters(model: nn.Module) -> ParameterCounts:
    """``(trainable, total)`` logical counts (a NamedTuple); safe on meta models."""
    return count_parameters(model)


def print_trainable_parameters(model: nn.Module, name: str = "Model") -> tuple[int, int]:
    """Log a 7-line parameter summary once, on rank 0, and return ``(trainable, total)``.

    Every rank must call it for a sharded model (the norm is a collective).
    """
    total, trainable, norm = _get_model_param_stats(model)
    if is_rank_0():
        pct = 100.0 * trainable / total if total > 0 else 0.0
        for line in (
            f"{name} summary:",
            "--------------------------------",
            f"Trainable parameters: {trainable:,}",
            f"Total parameters: {total:,}",
            f"Trainable parameters percentage: {pct:.2f}%",
            f"Param L2 norm: {norm:.4f}",
            "--------------------------------",
        ):
            logger.info(line)
    return trainable, total


def _freeze_module_by_attribute_and_patterns(
    model: nn.Module, attribute_name: str | None, name_patterns: Iterable[str]
) -> None:
    """Freeze ``getattr(model, attribute_name)`` and modules whose path components start with a pattern."""
    freeze_module_by_attribute_and_patterns(model, attribute_name, name_patterns)


def apply_parameter_freezing(
    model: nn.Module, freeze_config: FreezeConfig | Mapping[str, Any], *, strict: bool = True
) -> None:
    """Freeze by config (reference 0.7.0 semantics, all or nothing).

    Compatibility side effect kept from the reference: for ``model_type == "phi4mm"`` it also casts
    fp32 parameters and buffers to bf16 and sets ``config.use_cache = False`` (its remote code needs
    both under FSDP2 and transformers v5).
    """
    _apply_parameter_freezing(model, freeze_config, strict=strict)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", "") == "phi4mm":
        cast_mixed_dtype_params_to_bf16(model)
        config.use_cache = False


def freeze_unused_kv_sharing_params(model: nn.Module) -> None:
    _freeze_kv_sharing(model)


def freeze_deepseek_v4_indexer_params(model: nn.Module) -> None:
    count = _freeze_deepseek_v4(model)
    if count:
        logger.info("Froze %d DeepSeek V4 indexer parameters.", count)


def freeze_minimax_m3_indexer_params(model: nn.Module) -> None:
    count = _freeze_minimax_m3(model)
    if count:
        logger.info("Froze %d MiniMax M3 indexer parameters.", count)


def cast_mixed_dtype_params_to_bf16(model: nn.Module) -> None:
    """Cast every fp32 parameter *and buffer* to bf16 in place (the reference casts buffers too)."""
    cast_floating_point(model, torch.bfloat16, cast_buffers=True)


def enable_radio_vit_fused_attn(model: nn.Module) -> None:
    _enable_radio(model)


def resolve_trust_remote_code(pretrained_model_name_or_path) -> bool:
    """True only for ``nvidia/<name>`` hub names (never local directories or path tricks)."""
    return _resolve_trust_remote_code(pretrained_model_name_or_path)
