"""What a model's ``forward`` accepts, cached by the class's ``forward`` *function* (never a module or bound
method, which would keep a model and its GPU memory alive); patched forwards are read every time."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

VLM_INPUT_KEYS: tuple[str, ...] = (
    "input_ids", "pixel_values", "image_flags", "imgs_sizes", "image_position_ids", "mm_token_type_ids",
    "image_grid_hws", "image_grid_thw", "image_sizes", "patch_pixel_values", "num_patches", "patch_newline_mask",
    "image_embeds", "pixel_values_videos", "video_grid_thw", "sound_features", "sound_attention_mask",
    "audio_input_values", "audio_attention_mask",
)


@functools.lru_cache(maxsize=256)
def _signature_without_self(function: Callable[..., Any]) -> inspect.Signature | None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    return signature.replace(parameters=list(signature.parameters.values())[1:])


def get_forward_signature(model: nn.Module) -> inspect.Signature | None:
    """The signature of ``model.forward`` without its receiver, or None when it cannot be read."""
    forward = getattr(model, "forward", None)
    if not callable(forward):
        return None
    function = getattr(forward, "__func__", None)
    if getattr(forward, "__self__", None) is model and function is not None:
        if inspect.getattr_static(type(model), "forward", None) is function:  # the class's own: cacheable
            return _signature_without_self(function)
    try:
        return inspect.signature(forward)
    except (TypeError, ValueError):
        return None


def _accepts_var_keyword(signature: inspect.Signature) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())


def supports_logits_to_keep(model: nn.Module) -> bool:
    """True only for an explicit ``logits_to_keep`` parameter (``**kwargs`` does not count)."""
    signature = get_forward_signature(model)
    return signature is not None and "logits_to_keep" in signature.parameters


def supports_seq_lens(model: nn.Module) -> bool:
    """True for an explicit ``seq_lens`` parameter or any ``**kwargs``."""
    signature = get_forward_signature(model)
    return signature is not None and ("seq_lens" in signature.parameters or _accepts_var_keyword(signature))


def filter_forward_kwargs(model: nn.Module, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict with only the keys ``model.forward`` accepts (all of them when it takes ``**kwargs``)."""
    signature = get_forward_signature(model)
    if signature is None or _accepts_var_keyword(signature):
        return dict(kwargs)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = {name for name, p in signature.parameters.items() if p.kind in kinds}
    kept = {k: v for k, v in kwargs.items() if k in accepted}
    if len(kept) != len(kwargs):
        logger.debug(
            "Dropping unsupported forward kwargs for %s: %s", type(model).__name__, sorted(set(kwargs) - accepted)
        )
    return kept
