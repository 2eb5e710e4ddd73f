"""Packing sequences into one THD row with Python ints, so training never syncs with the device for it;
``cu_seqlens_padded`` rounds each up to ``pad_to_multiple_of`` (TE with context parallelism wants that)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch


def pack_thd(
    sequences: Sequence[Sequence[int]], *, pad_to_multiple_of: int = 1, seqlens_padding_value: int = -1000,
    max_sequences: int | None = None, label_ignore_index: int = -100, pad_token_id: int = 0,
    labels: Sequence[Sequence[int]] | None = None,
) -> dict:
    """Pack non-empty sequences into ``[1, T]`` tensors plus THD metadata. Labels (``labels`` or the ids) get
    ``label_ignore_index`` on padding and at each sequence start (not predicted from the previous sequence).
    ``max_sequences``: room in the boundary vectors (default: this batch's count)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pack_thd needs at least one sequence and no empty sequence.")
    if labels is not None and [len(x) for x in labels] != [len(x) for x in sequences]:
        raise ValueError("pack_thd: labels must have one list per sequence, each as long as its sequence.")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1; got {pad_to_multiple_of}.")
    room = max_sequences if max_sequences is not None else len(sequences)
    if room < len(sequences):
        raise ValueError(f"{len(sequences)} sequences do not fit max_sequences={room}.")
    ids: list[int] = []
    out_labels: list[int] = []
    positions: list[int] = []
    padding: list[bool] = []
    cu, cu_padded = [0], [0]
    for k, seq in enumerate(sequences):
        n = len(seq)
        targets = labels[k] if labels is not None else seq
        padded = -(-n // pad_to_multiple_of) * pad_to_multiple_of
        extra = padded - n
        ids.extend([*seq, *[pad_token_id] * extra])
        out_labels.extend([label_ignore_index, *targets[1:], *[label_ignore_index] * extra])
        positions.extend(range(padded))
        padding.extend([False] * n + [True] * extra)
        cu.append(cu[-1] + n)
        cu_padded.append(cu_padded[-1] + padded)
    fill = [seqlens_padding_value] * (room - len(sequences))
    # With padding, cu_seqlens marks the real tokens of a row laid out by cu_seqlens_padded (TE's pad_between_seqs).
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([out_labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "padding_mask": torch.tensor([padding], dtype=torch.bool),
        "cu_seqlens": torch.tensor([cu + fill], dtype=torch.int32),
        "cu_seqlens_padded": torch.tensor([cu_padded + fill], dtype=torch.int32),
        "max_seqlen": max(len(s) for s in sequences),
        "num_sequences": len(sequences),  # host int: THDSqueeze cuts the sentinels without reading the device
        "qkv_format": "thd",
    }


def plan_rows(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Document indices per row of at most ``row_length`` tokens, by best-fit decreasing (less room wasted)."""
    if any(n < 1 or n > row_length for n in lengths):
        raise ValueError(f"plan_rows: every length must be in [1, {row_length}].")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    rows: list[list[int]] = []
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            room, row = row_length - n, len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, row))
    return rows
