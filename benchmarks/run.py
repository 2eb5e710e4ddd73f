"""``python -m benchmarks.run [--smoke] [--only NAME] [--out PATH]``: run the cases, write RESULTS.md."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

from benchmarks.harness import REPO

CASES = ("surgery", "dtypes_inspection", "cast_memory", "optimizer_state", "packing", "step_overhead", "plan")


def machine() -> str:
    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition, no target judgement")
    parser.add_argument("--only", choices=CASES, action="append")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.smoke else 5)
    out = Path(args.out) if args.out else REPO / "benchmarks" / ("RESULTS-smoke.md" if args.smoke else "RESULTS.md")
    import importlib

    sections = []
    for name in args.only or CASES:
        start = time.perf_counter()
        results = importlib.import_module(f"benchmarks.case_{name}").run(args.smoke, repeats)
        sections.extend(r.markdown() for r in results)
        print(f"{name}: {len(results)} result(s) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    header = [
        "# Benchmark results" + (" (smoke)" if args.smoke else ""),
        "",
        f"Run on {datetime.date.today()} on {machine()}; {repeats} alternating repetition(s) per case, median and min–max.",
        "Ratios are each row's median over ours (below 1: the peer is smaller/faster). Regenerate with `make bench`.",
        "",
    ]
    out.write_text("\n".join(header) + "\n".join(sections))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
