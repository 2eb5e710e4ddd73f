"""Case 3: peak extra resident memory of a bf16 cast of a >= 1 GB fp32 model."""

from __future__ import annotations

import json
import sys

import torch
from torch import nn

from benchmarks.harness import CaseResult, Row, reset_peak_rss, rss_kib, run_probe


def model(layers: int, width: int) -> nn.Module:
    """One 2*width square Linear (the largest tensor, 4x a layer's) followed by ``layers`` width-square Linears."""
    torch.manual_seed(0)
    big = nn.Linear(width, 2 * width)
    return nn.Sequential(big, nn.Linear(2 * width, width), *(nn.Linear(width, width) for _ in range(layers)))


def probe(impl: str, layers: int, width: int) -> None:
    # Import before the baseline so module import memory is not counted as cast memory.
    if impl == "ours":
        from lightning_automodel.core.dtypes import cast_floating_point

        cast = lambda m: cast_floating_point(m, torch.bfloat16)  # noqa: E731
    elif impl == "ref":
        from nemo_automodel.components.utils.model_utils import cast_mixed_dtype_params_to_bf16 as cast
    else:
        cast = lambda m: m.to(torch.bfloat16)  # noqa: E731
    m = model(layers, width)
    for p in m.parameters():
        p.data.add_(0)  # touch every page so the baseline is resident
    largest = max(p.numel() * p.element_size() for p in m.parameters())
    total = sum(p.numel() * p.element_size() for p in m.parameters())
    reset_peak_rss()
    base = rss_kib("VmRSS")
    cast(m)
    peak = rss_kib("VmHWM")
    after = rss_kib("VmRSS")
    if not all(p.dtype == torch.bfloat16 for p in m.parameters()):
        raise RuntimeError(f"{impl} left parameters that are not bf16")
    print(json.dumps({"extra_bytes": (peak - base) * 1024, "largest_fp32": largest, "total_fp32": total,
                      "freed_bytes": (base - after) * 1024}))


def run(smoke: bool, repeats: int) -> list[CaseResult]:
    # Full size: two 128 MiB Linears (4096 <-> 8192) and twelve 64 MiB ones, 1.0 GiB of fp32.
    layers, width = (4, 256) if smoke else (12, 4096)
    impls = {"ours": "ours", "nemo-automodel 0.7.0": "ref", "model.to(torch.bfloat16)": "to"}
    samples: dict[str, list[float]] = {name: [] for name in impls}
    out: dict = {}
    for _ in range(repeats):
        for name, key in impls.items():  # alternating, a fresh process per measurement
            out = run_probe("case_cast_memory", "probe", key, str(layers), str(width))
            samples[name].append(out["extra_bytes"] / 2**20)
    largest, total = out["largest_fp32"], out["total_fp32"]
    r = CaseResult(
        f"3. bf16 cast of a {total / 2**30:.2f} GiB fp32 model: peak extra resident memory",
        target="peak extra at most 1.1 × the largest single tensor's fp32 bytes",
    )
    r.rows = [Row(k, v, "MiB") for k, v in samples.items()]
    r.notes.append(
        f"Largest single tensor: {largest / 2**20:.0f} MiB in fp32, so the bound is {1.1 * largest / 2**20:.0f} MiB. "
        "Why that bound: a tensor-by-tensor cast holds at most one source tensor and its bf16 copy (half its size) "
        "at a time, and the source's pages were already resident; a whole-model copy would need half the model."
    )
    r.notes.append("Peak extra = VmHWM − VmRSS, with the high-water mark reset (`echo 5 > /proc/self/clear_refs`) just "
                   "before the cast, in a fresh process per measurement, with every import done before the reset.")
    if not smoke:
        r.met = r.rows[0].median * 2**20 <= 1.1 * largest
    return [r]


if __name__ == "__main__" and sys.argv[1] == "probe":
    probe(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
