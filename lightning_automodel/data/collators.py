"""Batch collators: padding (``[B, L]`` with an attention mask) and THD packing (``[1, T]``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_automodel.core.packing import pack_thd


class PaddingCollator:
    """Right-pad to the longest sequence of the batch; labels are -100 on padding."""

    def __init__(self, pad_token_id: int = 0, label_ignore_index: int = -100) -> None:
        self.pad_token_id = pad_token_id
        self.label_ignore_index = label_ignore_index

    def __call__(self, samples: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        length = max(len(s) for s in samples)
        ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        for i, s in enumerate(samples):
            ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, : len(s)] = 1
        labels = ids.masked_fill(mask == 0, self.label_ignore_index)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PackedSequenceCollator:
    """Pack a batch of samples into one ``[1, T]`` row with THD metadata (see :func:`core.packing.pack_thd`).

    The metadata is built on the host with Python ints, so nothing in the step syncs with the device.
    Hugging Face models use the per-sequence ``position_ids`` (attention never crosses sequences);
    THD kernels use ``cu_seqlens`` after :class:`~lightning_automodel.callbacks.THDSqueeze`.

    Args:
        pad_to_multiple_of: pad each sequence to a multiple of this (TE context parallelism wants 2 x cp size).
        max_sequences: fixed room in the boundary vectors (default: the batch's sequence count).
        seqlens_padding_value: sentinel that fills the boundary vectors.
    """

    def __init__(
        self,
        pad_to_multiple_of: int = 1,
        max_sequences: int | None = None,
        seqlens_padding_value: int = -1000,
        pad_token_id: int = 0,
    ) -> None:
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_sequences = max_sequences
        self.seqlens_padding_value = seqlens_padding_value
        self.pad_token_id = pad_token_id

    def __call__(self, samples: Sequence[Sequence[int]]) -> dict:
        return pack_thd(samples, **vars(self))  # every attribute is a pack_thd argument
