"""Batch collators: rows of packed documents (the data module's), plain padding, and THD packing of id lists."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any, Literal

import torch
from torch.nn.utils.rnn import pad_sequence

from lightning_automodel.core.packing import pack_thd

IGNORE = -100


class SFTCollator:
    """Packed rows (``input_ids``, ``labels``, ``seq_lens``) -> ``rows``: ``[B, pad_to or longest]``, no mask but
    per-document ``position_ids`` (transformers derives documents), trailing pads; ``thd``: ``[1, T]``, cu_seqlens."""

    def __init__(
        self, pad_token_id: int, pad_to: int | None = None, layout: Literal["rows", "thd"] = "rows", pad_to_multiple_of: int = 1
    ) -> None:
        self.pad_token_id, self.pad_to, self.layout, self.pad_to_multiple_of = pad_token_id, pad_to, layout, pad_to_multiple_of

    def __call__(self, rows: list[Mapping[str, list[int]]]) -> dict[str, Any]:
        if self.layout == "thd":
            spans = [(r, s, n) for r in rows for s, n in zip(accumulate(r["seq_lens"], initial=0), r["seq_lens"])]
            docs = [row["input_ids"][s : s + n] for row, s, n in spans]
            labels = [row["labels"][s : s + n] for row, s, n in spans]
            return pack_thd(docs, labels=labels, pad_to_multiple_of=self.pad_to_multiple_of, pad_token_id=self.pad_token_id)
        length = self.pad_to or max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
        positions = torch.arange(length, dtype=torch.long).repeat(len(rows), 1)
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[b, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            labels[b, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
            for start, seq in zip(accumulate(row["seq_lens"], initial=0), row["seq_lens"]):
                positions[b, start : start + seq] = torch.arange(seq)
            # Padding continues the last document's positions: no new "document" appears, and its labels are -100.
            last = row["seq_lens"][-1] if row["seq_lens"] else 0
            positions[b, n:] = torch.arange(last, last + length - n)
        return {"input_ids": ids, "labels": labels, "position_ids": positions}


class PaddingCollator:
    """Right-pad id lists to the longest of the batch, with an attention mask; labels are -100 on padding."""

    def __init__(self, pad_token_id: int = 0, label_ignore_index: int = IGNORE) -> None:
        self.pad_token_id, self.label_ignore_index = pad_token_id, label_ignore_index

    def __call__(self, samples: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        ids = pad_sequence([torch.as_tensor(list(s), dtype=torch.long) for s in samples], True, self.pad_token_id)
        mask = pad_sequence([torch.ones(len(s), dtype=torch.long) for s in samples], batch_first=True)
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, self.label_ignore_index)}


class PackedSequenceCollator:
    """Pack a batch of id lists into one ``[1, T]`` row with THD metadata, built on the host (see :func:`pack_thd`)."""

    def __init__(
        self, pad_to_multiple_of: int = 1, max_sequences: int | None = None, seqlens_padding_value: int = -1000, pad_token_id: int = 0
    ) -> None:
        self.pad_to_multiple_of, self.max_sequences = pad_to_multiple_of, max_sequences
        self.seqlens_padding_value, self.pad_token_id = seqlens_padding_value, pad_token_id

    def __call__(self, samples: Sequence[Sequence[int]]) -> dict:
        return pack_thd(samples, **vars(self))  # every attribute is a pack_thd argument
