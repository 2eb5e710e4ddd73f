"""Drop-in for ``nemo_automodel.components.utils.model_utils``: same names, parameters and results.

Thin façade over :mod:`lightning_automodel.core`, so code written against the reference keeps
working while it moves to Lightning. Where behaviour differs from the reference it is on purpose
and documented here and in the core module:

* legacy freeze flags match dotted path components by prefix (``context_proj`` is not "text");
  a freeze config that fails validation or a strict selector leaves the model untouched;
* the KV-sharing dead-parameter rule only touches the text decoder's layers, never a vision
  encoder's ``layers.N.self_attn.k_proj``;
* ``_get_model_param_stats`` returns the squared L2 norm like the reference, but summed over every
  rank for sharded (DTensor) parameters, so it is a collective;
* ``print_trainable_parameters`` logs once, on rank 0, through this module's logger.
"""

from __future__ import annotations

import logging
import math
import os
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
    FreezeReport,
    ModuleSelector,
    apply_parameter_freezing as _apply_parameter_freezing,
    freeze_module_by_attribute_and_patterns,
    parse_freeze_config as _parse_freeze_config,
)
from lightning_automodel.core.init import init_empty_weights, skip_random_init
from lightning_automodel.core.parameters import ParameterCounts, count_parameters, global_squared_l2_norm, logical_numel
from lightning_automodel.core.thd import squeeze_input_for_thd
from lightning_automodel.core.tied_head import get_lm_head_module, get_lm_head_weight
from lightning_automodel.core.trust import resolve_trust_remote_code as _resolve_trust_remote_code
from lightning_automodel.core.vision import enable_radio_vit_fused_attn as _enable_radio

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


def _get_logical_numel(param: torch.Tensor) -> int:
    """Logical element count: a quantized bitsandbytes ``Params4bit`` counts its unpacked shape."""
    return logical_numel(param)


def _get_model_param_stats(model: nn.Module) -> tuple[int, int, float]:
    """``(total, trainable, squared L2 norm)``, in the reference's order and units.

    The reference returns the *squared* norm of the local shard; this returns the squared norm of
    the whole model, summed over ranks for DTensor parameters. That makes it a collective for a
    sharded model: every rank must call it. ``nan`` for a model on the meta device.
    """
    counts = count_parameters(model)
    return counts.total, counts.trainable, global_squared_l2_norm(model)


def count_model_parameters(model: nn.Module) -> ParameterCounts:
    """``(trainable, total)`` logical counts (a NamedTuple, so it unpacks like the reference's tuple).

    Safe on meta models; a tied weight is counted once.
    """
    return count_parameters(model)


def print_trainable_parameters(model: nn.Module, name: str = "Model") -> tuple[int, int]:
    """Log a 7-line parameter summary once, on rank 0, and return ``(trainable, total)``.

    Same lines as the reference, but through this module's ``logger`` (the reference uses the root
    logger, which every rank prints), and the norm is the global one. Every rank must call it for a
    sharded model, because the norm is a collective.
    """
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
    """Freeze ``getattr(model, attribute_name)`` and modules whose path components start with a pattern.

    Unlike the reference's substring match, ``"text"`` does not freeze ``context_proj``; an
    attribute that is missing or ``None`` is skipped.
    """
    freeze_module_by_attribute_and_patterns(model, attribute_name, name_patterns)


def parse_freeze_config(config: FreezeConfig | Mapping[str, Any] | None) -> FreezeConfig | None:
    """Validate a raw ``freeze_config`` mapping; ``None`` stays ``None`` (no freeze config), as in the reference.

    Raises:
        TypeError: ``config`` is not a mapping.
        ValueError: unknown options (the message lists the valid ones), non-boolean flags or
            malformed selectors.
    """
    if config is None:
        return None
    return _parse_freeze_config(config)


def apply_parameter_freezing(
    model: nn.Module, freeze_config: FreezeConfig | Mapping[str, Any] | None, *, strict: bool = True
) -> FreezeReport:
    """Freeze by config with the reference 0.7.0 semantics, all or nothing.

    ``None`` is a no-op (as in the reference); ``{}`` freezes the vision tower (legacy default).
    The reference returns None; this returns the :class:`FreezeReport` (which rule froze what).

    Compatibility side effect kept from the reference: for ``model_type == "phi4mm"`` it also casts
    fp32 parameters and buffers to bf16 and sets ``config.use_cache = False``, because Phi-4-MM's
    remote code has fp32 adapters that FSDP2 rejects and a KV cache that transformers v5 removed.

    Raises:
        TypeError, ValueError: see :func:`parse_freeze_config`; ``ValueError`` naming the selector
            when ``strict`` and a selector matches no parameter. The model is unchanged then.
    """
    if freeze_config is None:
        return FreezeReport()
    report = _apply_parameter_freezing(model, freeze_config, strict=strict)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", "") == "phi4mm":
        cast_mixed_dtype_params_to_bf16(model)
        config.use_cache = False
    return report


def freeze_unused_kv_sharing_params(model: nn.Module) -> None:
    """Freeze ``k_proj``/``v_proj``/``k_norm``/``v_norm`` of the last ``num_kv_shared_layers`` text-decoder layers.

    Those layers reuse K/V from earlier layers, so the tensors never get a gradient, never get
    optimizer state, and a DCP resume would fail on the missing ``optim.state...step`` keys. Unlike
    the reference, a vision encoder's identically named layers are left alone.
    """
    _freeze_kv_sharing(model)


def freeze_deepseek_v4_indexer_params(model: nn.Module) -> None:
    """Freeze DeepSeek V4 ``self_attn.compressor.indexer`` parameters (they only feed ``topk(...).indices``)."""
    count = _freeze_deepseek_v4(model)
    if count:
        logger.info("Froze %d DeepSeek V4 indexer parameters.", count)


def freeze_minimax_m3_indexer_params(model: nn.Module) -> None:
    """Freeze MiniMax M3 ``self_attn.indexer`` parameters (model types starting with ``minimax_m3``)."""
    count = _freeze_minimax_m3(model)
    if count:
        logger.info("Froze %d MiniMax M3 indexer parameters.", count)


def cast_mixed_dtype_params_to_bf16(model: nn.Module) -> None:
    """Cast every fp32 parameter *and buffer* to bf16 in place, keeping each ``Parameter`` object.

    Buffers are cast because the reference casts them (RoPE ``inv_freq`` included); use
    :func:`lightning_automodel.core.dtypes.cast_floating_point` to keep buffers in fp32. Works
    before and after FSDP2 ``fully_shard``.
    """
    cast_floating_point(model, torch.bfloat16, cast_buffers=True)


def enable_radio_vit_fused_attn(model: nn.Module) -> None:
    """Turn on fused attention in RADIO ViT blocks (avoids a (B, H, seq, seq) tensor per block)."""
    _enable_radio(model)


def resolve_trust_remote_code(pretrained_model_name_or_path: str | os.PathLike | None) -> bool:
    """True only for ``nvidia/<name>`` hub names (never local directories or path tricks)."""
    return _resolve_trust_remote_code(pretrained_model_name_or_path)
