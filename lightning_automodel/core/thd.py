"""THD inputs for Transformer Engine attention: a packed ``[1, T]`` row, sentinel-filled ``cu_seqlens``, becomes
1-D tensors without sentinels. Finding sentinels syncs with the device, so a batch's ``num_sequences`` (a host
int, as ``pack_thd`` gives) slices them instead; without it, one warning."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import torch

log = logging.getLogger(__name__)

SEQLEN_KEYS: tuple[str, ...] = ("cu_seqlens", "cu_seqlens_padded")
NUM_SEQUENCES_KEY = "num_sequences"
_warned_sync = False


def _validate(position_ids: Any, attn_kwargs: MutableMapping[str, Any]) -> None:
    if position_ids is None:
        raise ValueError(
            "squeeze_input_for_thd needs position_ids (got None): THD attention derives positions from it. "
            "Pass the packed position_ids [1, T] that the collator produced."
        )
    count = attn_kwargs.get(NUM_SEQUENCES_KEY)
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(
            f"{NUM_SEQUENCES_KEY} must be a positive Python int (the packed row's sequence count); got {count!r}."
        )
    for key in SEQLEN_KEYS:
        value = attn_kwargs.get(key)
        if not isinstance(value, torch.Tensor):
            continue
        if value.dim() > 1 and value.shape[0] != 1:
            raise ValueError(
                f"THD expects one packed row; got {key} of shape {list(value.shape)}. "
                "Pack the whole micro-batch into one row (batch size 1) before squeezing."
            )
        if count is not None and value.shape[-1] < count + 1:
            raise ValueError(
                f"{key} has {value.shape[-1]} entries, too few for {NUM_SEQUENCES_KEY}={count} "
                f"(it needs {count + 1}): the batch's metadata disagree; pack it with pack_thd."
            )
    max_seqlen = attn_kwargs.get("max_seqlen")
    if isinstance(max_seqlen, torch.Tensor) and max_seqlen.numel() != 1:
        raise ValueError(
            f"max_seqlen must hold one value; got a tensor of shape {list(max_seqlen.shape)}. "
            "Pass the longest sequence length of the packed row (a Python int avoids a device sync)."
        )


def _warn_if_on_device(value: torch.Tensor, key: str) -> None:
    global _warned_sync
    if value.device.type != "cpu" and not _warned_sync:
        _warned_sync = True
        log.warning(
            "THD squeeze: %s is a device tensor and the batch has no %s, so reading it syncs with the device "
            "every step. Add %s (the packed row's sequence count, a Python int) to the batch and make max_seqlen "
            "an int, as PackedSequenceCollator / pack_thd do.", key, NUM_SEQUENCES_KEY, NUM_SEQUENCES_KEY,
        )


def squeeze_input_for_thd(
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor,
    padding_mask: torch.Tensor | None,
    attn_kwargs: MutableMapping[str, Any],
    seqlens_padding_value: int = -1000,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None, MutableMapping[str, Any]]:
    """Squeeze a packed ``[1, T]`` batch to THD form, updating ``attn_kwargs`` in place (and returning it); all
    validated first: a ``ValueError`` leaves ``attn_kwargs`` as it was."""
    _validate(position_ids, attn_kwargs)
    if input_ids is not None:
        input_ids = input_ids.squeeze(0)
    position_ids = position_ids.squeeze(0)
    if isinstance(padding_mask, torch.Tensor):
        padding_mask = padding_mask.squeeze(0)
    count = attn_kwargs.get(NUM_SEQUENCES_KEY)
    updated: dict[str, Any] = {}
    for key, value in attn_kwargs.items():
        if not isinstance(value, torch.Tensor):
            continue
        if key in SEQLEN_KEYS and count is not None:
            updated[key] = value.reshape(-1)[: count + 1].contiguous()  # the sentinels are a suffix: no data read
        elif key in SEQLEN_KEYS:
            _warn_if_on_device(value, key)
            updated[key] = value[value != seqlens_padding_value].contiguous()  # 1-D, dtype kept
        elif key == "max_seqlen":
            _warn_if_on_device(value, key)
            updated[key] = int(value.item())
        else:
            updated[key] = value.squeeze(0)
    attn_kwargs.update(updated)
    return input_ids, position_ids, padding_mask, attn_kwargs
