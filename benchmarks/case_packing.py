"""Case 5: THD packing vs padding on a skewed length distribution: throughput and padded fraction."""

from __future__ import annotations

import random

from benchmarks.harness import CaseResult, Row, alternate
from lightning_automodel.data.collators import PackedSequenceCollator, PaddingCollator


def run(smoke: bool, repeats: int) -> list[CaseResult]:
    rng = random.Random(0)
    n_batches, batch_size = (20, 8) if smoke else (400, 16)
    lengths = [[max(2, min(2048, int(rng.lognormvariate(5, 1)))) for _ in range(batch_size)] for _ in range(n_batches)]
    batches = [[[rng.randrange(3, 250) for _ in range(n)] for n in batch] for batch in lengths]
    tokens = sum(sum(b) for b in lengths)
    packer, padder = PackedSequenceCollator(pad_to_multiple_of=8), PaddingCollator()
    impls = {"ours (PackedSequenceCollator)": lambda: [packer(b) for b in batches], "padding collator": lambda: [padder(b) for b in batches]}
    times = alternate(impls, repeats)
    r = CaseResult(f"5. Collating {n_batches} batches of {batch_size} lognormal-length sequences: tokens per second",
                   ours="ours (PackedSequenceCollator)", target="report (no target)")
    r.rows = [Row(k, [tokens / t for t in v], "tokens/s") for k, v in times.items()]
    packed_total = sum(packer(b)["input_ids"].numel() for b in batches)
    padded_total = sum(padder(b)["input_ids"].numel() for b in batches)
    r.notes.append(f"Padded tokens: packing {1 - tokens / packed_total:.1%} (each sequence rounded up to a multiple of 8), padding {1 - tokens / padded_total:.1%}.")
    return [r]
