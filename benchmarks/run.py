"""``python -m benchmarks.run [--smoke] [--only CASE] [--repeats N] [--out PATH]``: run the cases, write RESULTS.md."""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import os
import platform
import sys
import threading
import time
from pathlib import Path

from benchmarks.harness import REPO, WORK, CaseResult

CASES = ("surgery", "dtypes_inspection", "cast_memory", "optimizer_state", "packing", "step_overhead", "plan", "load", "export", "lora",
         "layout_planning", "random_init", "hf_checkpoint", "data", "step_after_load")


class LoadSampler(threading.Thread):
    """Samples the 1-minute load average every few seconds, to say whether the machine was shared."""

    def __init__(self, every_s: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.every_s = every_s
        self.samples: list[float] = [os.getloadavg()[0]]
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every_s):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.samples.append(os.getloadavg()[0])


def machine() -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {importlib.import_module('transformers').__version__}, "
            f"lightning {importlib.import_module('lightning').__version__}")


def peers() -> str:
    accelerate = importlib.util.find_spec("accelerate") is not None
    return ("Peers: NeMo AutoModel 0.7.0 (the reference, installed without its dependencies), Lightning's ModelSummary, "
            "plain PyTorch (`model.to`, a hand-written padding collator, a bare Trainer). Hugging Face accelerate: "
            + ("installed." if accelerate else "not installed in this environment, so it is not measured."))


def verdict(result: CaseResult) -> str:
    if result.met is None:
        return "reported" if result.target.startswith("report") else "not judged"
    return "met" if result.met else "**missed**"


def summary(results: list[CaseResult]) -> list[str]:
    judged = [r for r in results if r.target and not r.target.startswith("report")]
    lines = ["## Summary", "", "| result | target | verdict |", "|---|---|---|"]
    lines += [f"| {r.title} | {r.target} | {verdict(r)} |" for r in judged]
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition, no target judgement")
    parser.add_argument("--only", choices=CASES, action="append", help="run only this case (repeatable)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating repetitions (default 5, smoke 1)")
    parser.add_argument("--out", default=None, help="report path (default benchmarks/RESULTS.md; smoke: RESULTS-smoke.md; with --only: benchmarks/_work/)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.smoke else 5)
    if args.out:
        out = Path(args.out)
    elif args.only:  # a partial run never overwrites the full report
        out = WORK / f"RESULTS-{'-'.join(args.only)}{'-smoke' if args.smoke else ''}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
    else:
        out = REPO / "benchmarks" / ("RESULTS-smoke.md" if args.smoke else "RESULTS.md")
    load = LoadSampler()
    load.start()
    started = time.perf_counter()
    results: list[CaseResult] = []
    for name in args.only or CASES:
        start = time.perf_counter()
        case_results = importlib.import_module(f"benchmarks.case_{name}").run(args.smoke, repeats)
        results.extend(case_results)
        print(f"{name}: {len(case_results)} result(s) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    load.stop()
    header = [
        "# Benchmark results" + (" (smoke: tiny sizes, not judged)" if args.smoke else ""),
        "",
        f"Run on {datetime.date.today()} on {machine()}, in {time.perf_counter() - started:.0f} s; "
        f"{repeats} alternating repetition(s) per timing (ours, peer, ours, peer, ...), median and min–max.",
        f"1-minute load average: {load.samples[0]:.2f} at the start, {max(load.samples):.2f} at most (sampled every 5 s). "
        "The run itself keeps about one core busy, so a figure well above 1 means other work shared the 2 cores"
        + (" (it did during this run), which widens the spreads." if max(load.samples) > 1.3 else "; it stayed below that."),
        peers(),
        "The ratio column is each row's median over ours for the same metric (above 1: the peer is slower or larger). "
        "Regenerate with `python -m benchmarks.run` (`make bench`); definitions and caveats: docs/benchmarks.md.",
        "",
    ]
    body = [r.markdown() for r in results]
    out.write_text("\n".join(header + ([] if args.smoke else summary(results)) + body))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
