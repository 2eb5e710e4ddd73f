"""THD (packed, token-major) inputs for Transformer Engine style attention.

A packed batch arrives as one row ``[1, T]`` with ``cu_seqlens`` marking sequence boundaries; padded
boundary vectors are filled with a sentinel so they can be stacked by a collator. TE wants 1-D
``[T]`` tensors, boundary vectors without sentinels, and ``max_seqlen`` as a Python int.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch

SEQLEN_KEYS: tuple[str, ...] = ("cu_seqlens", "cu_seqlens_padded")


def _validate(position_ids: Any, attn_kwargs: MutableMapping[str, Any]) -> None:
    if position_ids is None:
        raise ValueError(
            "squeeze_input_for_thd needs position_ids (got None): THD attention derives positions from it. "
            "Pass the packed position_ids [1, T] that the collator produced."
        )
    for key in SEQLEN_KEYS:
        value = attn_kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 1 and value.shape[0] != 1:
            raise ValueError(
                f"THD expects one packed row; got {key} of shape {list(value.shape)}. "
                "Pack the whole micro-batch into one row (batch size 1) before squeezing."
            )
    max_seqlen = attn_kwargs.get("max_seqlen")
    if isinstance(max_seqlen, torch.Tensor) and max_seqlen.numel() != 1:
        raise ValueError(
            f"max_seqlen must hold one value; got a tensor of shape {list(max_seqlen.shape)}. "
            "Pass the longest sequence length of the packed row (a Python int avoids a device sync)."
        )


def squeeze_input_for_thd(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    padding_mask: torch.Tensor | None,
    attn_kwargs: MutableMapping[str, Any],
    seqlens_padding_value: int = -1000,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, MutableMapping[str, Any]]:
    """Squeeze a packed ``[1, T]`` batch to THD form.

    ``attn_kwargs`` is updated in place and also returned: tensors lose dim 0, ``cu_seqlens`` /
    ``cu_seqlens_padded`` lose every sentinel entry (dtype kept), a tensor ``max_seqlen`` becomes an
    int. Everything is validated first, so an error leaves ``attn_kwargs`` as it was.

    Raises:
        ValueError: ``position_ids`` is None, ``max_seqlen`` has several values, or a seqlens tensor
            has more than one row.
    """
    _validate(position_ids, attn_kwargs)
    if input_ids is not None:
        input_ids = input_ids.squeeze(0)
    position_ids = position_ids.squeeze(0)
    if isinstance(padding_mask, torch.Tensor):
        padding_mask = padding_mask.squeeze(0)
    updated: dict[str, Any] = {}
    for key, value in attn_kwargs.items():
        if not isinstance(value, torch.Tensor):
            continue
        if key in SEQLEN_KEYS:
            updated[key] = value[value != seqlens_padding_value].contiguous()
        elif key == "max_seqlen":
            updated[key] = int(value.item())
        else:
            updated[key] = value.squeeze(0)
    attn_kwargs.update(updated)
    return input_ids, position_ids, padding_mask, attn_kwargs
