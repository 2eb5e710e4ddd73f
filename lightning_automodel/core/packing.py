"""Packing variable-length sequences into one THD row, on the host.

Everything a THD kernel needs is computed here with Python ints, so the training loop never syncs
with the device for it: ``max_seqlen`` is an int, boundary vectors are ready. ``cu_seqlens_padded``
rounds each sequence up to ``pad_to_multiple_of`` (Transformer Engine with context parallelism wants
that) and both boundary vectors are filled to a fixed length with the sentinel so batches stack.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack_thd(
    sequences: Sequence[Sequence[int]],
    *,
    pad_to_multiple_of: int = 1,
    seqlens_padding_value: int = -1000,
    max_sequences: int | None = None,
    label_ignore_index: int = -100,
    pad_token_id: int = 0,
) -> dict:
    """Pack token sequences into ``[1, T]`` tensors plus THD metadata.

    Labels are the input ids with ``label_ignore_index`` at every sequence start (the shifted loss must
    not predict a sequence's first token from the previous sequence) and on padding.

    Args:
        sequences: token id lists, each non-empty.
        pad_to_multiple_of: each sequence's padded length is a multiple of this.
        seqlens_padding_value: sentinel that fills the boundary vectors up to ``max_sequences + 1``.
        max_sequences: fixed number of sequences the boundary vectors have room for (default: this batch's).
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pack_thd needs at least one sequence and no empty sequence.")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1; got {pad_to_multiple_of}.")
    room = max_sequences if max_sequences is not None else len(sequences)
    if room < len(sequences):
        raise ValueError(f"{len(sequences)} sequences do not fit max_sequences={room}.")
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    padding: list[bool] = []
    cu, cu_padded = [0], [0]
    for seq in sequences:
        n = len(seq)
        padded = -(-n // pad_to_multiple_of) * pad_to_multiple_of
        ids.extend(seq)
        labels.extend([label_ignore_index, *seq[1:]])
        positions.extend(range(n))
        padding.extend([False] * n)
        extra = padded - n
        ids.extend([pad_token_id] * extra)
        labels.extend([label_ignore_index] * extra)
        positions.extend(range(n, n + extra))
        padding.extend([True] * extra)
        cu.append(cu[-1] + n)
        cu_padded.append(cu_padded[-1] + padded)
    fill = [seqlens_padding_value] * (room - len(sequences))
    # Without padding the packed row is contiguous in cu_seqlens; with it, cu_seqlens marks real tokens of
    # a row laid out by cu_seqlens_padded (what TE expects with pad_between_seqs).
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "padding_mask": torch.tensor([padding], dtype=torch.bool),
        "cu_seqlens": torch.tensor([cu + fill], dtype=torch.int32),
        "cu_seqlens_padded": torch.tensor([cu_padded + fill], dtype=torch.int32),
        "max_seqlen": max(len(s) for s in sequences),
        "qkv_format": "thd",
    }
