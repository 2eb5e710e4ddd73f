"""Squeeze packed THD batches in place before the forward (Transformer Engine attention)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_automodel._compat.lightning import callback_state_key
from lightning_automodel.core.thd import NUM_SEQUENCES_KEY, SEQLEN_KEYS, squeeze_input_for_thd

_ATTN_KEYS = (*SEQLEN_KEYS, "max_seqlen", NUM_SEQUENCES_KEY)


def squeeze_thd_batch(batch: Any, seqlens_padding_value: int = -1000) -> None:
    """Squeeze a ``PackedSequenceCollator`` batch to THD, in place; anything without THD metadata passes."""
    if not isinstance(batch, dict) or (batch.get("qkv_format") != "thd" and "cu_seqlens" not in batch):
        return
    attn = {k: batch[k] for k in _ATTN_KEYS if k in batch}
    input_ids, position_ids, padding_mask, attn = squeeze_input_for_thd(
        batch.get("input_ids"), batch.get("position_ids"), batch.get("padding_mask"), attn, seqlens_padding_value
    )
    batch.update(attn)
    if input_ids is not None:
        batch["input_ids"] = input_ids
    batch["position_ids"] = position_ids
    if padding_mask is not None:
        batch["padding_mask"] = padding_mask
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() > 1:
        batch["labels"] = labels.squeeze(0)


class THDSqueeze(Callback):
    """Turn packed ``[1, T]`` batches into THD form before ``training_step`` / ``validation_step``.

    For models whose attention takes THD inputs (Transformer Engine, custom MoE forwards); Hugging Face
    models that take ``[1, T]`` packed batches with ``position_ids`` do not need it.

    Args:
        seqlens_padding_value: the sentinel that pads ``cu_seqlens`` rows.
    """

    def __init__(self, seqlens_padding_value: int = -1000) -> None:
        self.seqlens_padding_value = seqlens_padding_value

    @property
    @override
    def state_key(self) -> str:
        return callback_state_key(self, seqlens_padding_value=self.seqlens_padding_value)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        squeeze_thd_batch(batch, self.seqlens_padding_value)

    on_validation_batch_start = on_test_batch_start = on_train_batch_start
