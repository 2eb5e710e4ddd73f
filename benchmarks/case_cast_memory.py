"""Case 3: peak extra resident memory of a bf16 cast of a >= 1 GB fp32 model."""

from __future__ import annotations

import json
import sys

import torch
from torch import nn

from benchmarks.harness import CaseResult, Row, reset_peak_rss, rss_kib, run_probe


def model(layers: int, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers)))


def probe(impl: str, layers: int, width: int) -> None:
    m = model(layers, width)
    for p in m.parameters():
        p.data.add_(0)  # touch every page so the baseline is resident
    largest = max(p.numel() * p.element_size() for p in m.parameters())
    reset_peak_rss()
    base = rss_kib("VmRSS")
    if impl == "ours":
        from lightning_automodel.core.dtypes import cast_floating_point

        cast_floating_point(m, torch.bfloat16)
    elif impl == "ref":
        from nemo_automodel.components.utils.model_utils import cast_mixed_dtype_params_to_bf16

        cast_mixed_dtype_params_to_bf16(m)
    else:
        m.to(torch.bfloat16)
    peak = rss_kib("VmHWM")
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    print(json.dumps({"extra_bytes": (peak - base) * 1024, "largest_fp32": largest}))


def run(smoke: bool, repeats: int) -> list[CaseResult]:
    layers, width = (4, 512) if smoke else (16, 4096)  # 16 x 64 MiB = 1 GiB of fp32
    impls = {"ours": "ours", "nemo-automodel 0.7.0": "ref", "model.to(torch.bfloat16)": "to"}
    samples = {name: [] for name in impls}
    largest = 0
    for _ in range(repeats):
        for name, key in impls.items():
            out = run_probe("case_cast_memory", "probe", key, str(layers), str(width))
            samples[name].append(out["extra_bytes"])
            largest = out["largest_fp32"]
    r = CaseResult(
        f"3. bf16 cast of a {layers * width * width * 4 / 2**30:.2f} GiB fp32 model: peak extra resident memory",
        target="peak extra at most 1.1 × the largest single tensor (its fp32 bytes)",
    )
    r.rows = [Row(k, v, "bytes") for k, v in samples.items()]
    r.notes.append(f"Largest single tensor: {largest / 2**20:.0f} MiB in fp32 ({largest / 2**21:.0f} MiB in bf16).")
    if not smoke:
        r.met = r.rows[0].median <= 1.1 * largest
    return [r]


if __name__ == "__main__" and sys.argv[1] == "probe":
    probe(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
