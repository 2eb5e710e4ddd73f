"""Drop-in for ``nemo_automodel.components.utils.model_utils`` over :mod:`lightning_automodel.core`. Differences:
freeze flags match path components by prefix, a failing freeze config leaves the model untouched, KV sharing
touches the text decoder only, the L2 norm is over ranks, the summary logs on rank 0, no trust by path tricks."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_automodel.core.dead_params import freeze_dead_parameters, kv_sharing_layers
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
    FreezeReport,
    ModuleSelector,
    apply_parameter_freezing as _apply_parameter_freezing,
    freeze_module_by_attribute_and_patterns,
    parse_freeze_config as _parse_freeze_config,
)
from lightning_automodel.core.init import init_empty_weights, skip_random_init
from lightning_automodel.core.parameters import (
    count_parameters as count_model_parameters,  # safe on meta models; a tied weight counts once
    global_squared_l2_norm,
    logical_numel as _get_logical_numel,
)
from lightning_automodel.core.thd import squeeze_input_for_thd
from lightning_automodel.core.tied_head import get_lm_head_module, get_lm_head_weight

logger = logging.getLogger(__name__)

__all__ = [
    "VLM_INPUT_KEYS", "FreezeConfig", "ModuleSelector", "_freeze_module_by_attribute_and_patterns",
    "_get_forward_signature", "_get_logical_numel", "_get_model_param_stats", "_supports_logits_to_keep",
    "_supports_seq_lens", "apply_parameter_freezing", "cast_mixed_dtype_params_to_bf16", "count_model_parameters",
    "enable_radio_vit_fused_attn", "filter_forward_kwargs", "freeze_deepseek_v4_indexer_params",
    "freeze_minimax_m3_indexer_params", "freeze_unused_kv_sharing_params", "get_lm_head_module",
    "get_lm_head_weight", "init_empty_weights", "logger", "parse_freeze_config", "print_trainable_parameters",
    "resolve_trust_remote_code", "skip_random_init", "squeeze_input_for_thd",
]

DEFAULT_TRUSTED_ORGS: tuple[str, ...] = ("nvidia",)
# Used with ``fullmatch``: ``$`` would also match before a trailing newline (``"nvidia/x\n"``).
_HUB_NAME = re.compile(r"(?P<org>[A-Za-z0-9][A-Za-z0-9_.-]*)/(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*)")


def _get_model_param_stats(model: nn.Module) -> tuple[int, int, float]:
    """``(total, trainable, squared L2 norm)`` as the reference, the norm over every rank (a collective)."""
    counts = count_model_parameters(model)
    return counts.total, counts.trainable, global_squared_l2_norm(model)


def print_trainable_parameters(model: nn.Module, name: str = "Model") -> tuple[int, int]:
    """Log the reference's 7-line summary on rank 0 through this module's logger; every rank calls it (the norm)."""
    total, trainable, sq_norm = _get_model_param_stats(model)
    if is_rank_0():
        pct = 100.0 * trainable / total if total > 0 else 0.0
        rule = "--------------------------------"
        logger.info("%s summary:", name)
        logger.info(rule)
        logger.info("Trainable parameters: %s", f"{trainable:,}")
        logger.info("Total parameters: %s", f"{total:,}")
        logger.info("Trainable parameters percentage: %.2f%%", pct)
        logger.info("Param L2 norm: %.4f", math.sqrt(sq_norm))
        logger.info(rule)
    return trainable, total


def _freeze_module_by_attribute_and_patterns(
    model: nn.Module, attribute_name: str | None, name_patterns: Iterable[str]
) -> None:
    """Freeze the ``attribute_name`` module (if any) and paths whose components start with a pattern."""
    freeze_module_by_attribute_and_patterns(model, attribute_name, name_patterns)


def parse_freeze_config(config: FreezeConfig | Mapping[str, Any] | None) -> FreezeConfig | None:
    """Validate a raw ``freeze_config`` mapping (TypeError, ValueError); ``None`` stays ``None``, as in the reference."""
    return None if config is None else _parse_freeze_config(config)


def apply_parameter_freezing(
    model: nn.Module, freeze_config: FreezeConfig | Mapping[str, Any] | None, *, strict: bool = True
) -> FreezeReport:
    """Freeze by config (reference 0.7.0), all or nothing; ``None``: no-op. ``phi4mm`` also gets a bf16 cast and
    ``use_cache = False`` (fp32 adapters FSDP2 rejects, a KV cache transformers v5 removed)."""
    if freeze_config is None:
        return FreezeReport()
    report = _apply_parameter_freezing(model, freeze_config, strict=strict)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", "") == "phi4mm":
        cast_mixed_dtype_params_to_bf16(model)
        config.use_cache = False
    return report


def freeze_unused_kv_sharing_params(model: nn.Module) -> None:
    """Freeze K/V projections and norms of the last ``num_kv_shared_layers`` text-decoder layers (dead: see core.dead_params)."""
    frozen = freeze_dead_parameters(model, ("kv_sharing",))
    if frozen:
        total, shared = kv_sharing_layers(model)  # type: ignore[misc]
        logger.info(
            "Froze %d dead KV-sharing parameters in layers %d-%d (num_kv_shared_layers=%d).",
            len(frozen), total - shared, total - 1, shared,
        )


def freeze_deepseek_v4_indexer_params(model: nn.Module) -> None:
    """Freeze DeepSeek V4 ``self_attn.compressor.indexer`` parameters (they only feed ``topk(...).indices``)."""
    count = len(freeze_dead_parameters(model, ("deepseek_v4_indexer",)))
    if count:
        logger.info("Froze %d DeepSeek V4 indexer parameters.", count)


def freeze_minimax_m3_indexer_params(model: nn.Module) -> None:
    """Freeze MiniMax M3 ``self_attn.indexer`` parameters (model types starting with ``minimax_m3``)."""
    count = len(freeze_dead_parameters(model, ("minimax_m3_indexer",)))
    if count:
        logger.info("Froze %d MiniMax M3 indexer parameters.", count)


def cast_mixed_dtype_params_to_bf16(model: nn.Module) -> None:
    """Cast every fp32 parameter *and buffer* (RoPE ``inv_freq`` too, as the reference) to bf16 in place."""
    cast_floating_point(model, torch.bfloat16, cast_buffers=True)


def enable_radio_vit_fused_attn(model: nn.Module) -> None:
    """Route RADIO ViT attention through SDPA: timm's default ``fused_attn=False`` materializes a (B, H, seq, seq)
    tensor of several GiB per block at RADIO's patch counts. No-op without a RADIO tower."""
    vision = getattr(model, "vision_model", None) or getattr(getattr(model, "model", None), "vision_model", None)
    blocks = getattr(getattr(getattr(vision, "radio_model", None), "model", None), "blocks", None)
    attns = [block.attn for block in blocks or () if getattr(block, "attn", None) is not None]
    for attn in attns:
        attn.fused_attn = True
    if attns:
        logger.info("Enabled fused_attn on %d RADIO ViT blocks", len(attns))


def resolve_trust_remote_code(
    pretrained_model_name_or_path: str | os.PathLike[str] | None, *, trusted_orgs: Iterable[str] = DEFAULT_TRUSTED_ORGS
) -> bool:
    """True only for a hub name ``<org>/<name>`` whose org is in ``trusted_orgs`` (case-sensitive; a string is one org);
    never a local directory or a path trick (``nvidia/../x``, ``./nvidia/x``, ``nvidia//x``)."""
    orgs = {trusted_orgs} if isinstance(trusted_orgs, str) else set(trusted_orgs)
    text = os.fspath(pretrained_model_name_or_path) if pretrained_model_name_or_path else ""
    if not isinstance(text, str) or not text or os.path.isdir(text):
        return False
    match = _HUB_NAME.fullmatch(text)  # a name starts with a letter or digit: never "." or ".."
    return match is not None and ".." not in match["name"] and match["org"] in orgs
