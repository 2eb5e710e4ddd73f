"""Peak extra resident memory of a bf16 cast, in a fresh process (prints JSON).

Usage: python core_cast_peak.py {ours|copy} LAYERS WIDTH

``copy`` casts by building a full bf16 copy first (what "cast everything, then swap" costs): the
test uses it to show that the measurement sees a full copy, so a pass for ``ours`` means something.
"""

import json
import sys

import torch
from torch import nn


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(impl: str, layers: int, width: int) -> None:
    from lightning_automodel.core.dtypes import cast_floating_point  # imported before measuring

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers)))
    for p in model.parameters():
        p.data.add_(0)  # touch every page so the baseline is resident
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base = rss_kib("VmRSS")
    if impl == "ours":
        cast_floating_point(model, torch.bfloat16)
    else:
        copies = {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.data = copies[n]
        del copies
    peak = rss_kib("VmHWM")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    print(json.dumps({"extra_bytes": (peak - base) * 1024, "largest_fp32": largest, "total_fp32": largest * layers}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
