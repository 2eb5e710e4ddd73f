"""Alternating runner, statistics and the markdown report shared by every case."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work"


@dataclass
class Row:
    """One implementation's samples of one metric; ``metric`` groups rows that are compared with each other."""

    name: str
    values: list[float]
    unit: str
    metric: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def spread(self) -> str:
        return f"{min(self.values):.4g}–{max(self.values):.4g}" if len(self.values) > 1 else "-"


@dataclass
class CaseResult:
    title: str
    rows: list[Row] = field(default_factory=list)
    ours: str = "ours"
    target: str = ""
    met: bool | None = None
    notes: list[str] = field(default_factory=list)

    def ours_row(self, metric: str = "") -> Row | None:
        return next((r for r in self.rows if r.name == self.ours and r.metric == metric), None)

    def markdown(self) -> str:
        with_metric = any(r.metric for r in self.rows)
        head = "| impl | metric " if with_metric else "| impl "
        lines = [f"### {self.title}", "", head + "| median | spread (min–max) | unit | ratio to ours |",
                 "|---" * (6 if with_metric else 5) + "|"]
        for r in self.rows:
            ours = self.ours_row(r.metric)
            ratio = f"{r.median / ours.median:.2f}×" if ours and ours.median else "-"
            metric = f" {r.metric} |" if with_metric else ""
            lines.append(f"| {r.name} |{metric} {r.median:.4g} | {r.spread()} | {r.unit} | {ratio} |")
        if self.target:
            if self.met is None:
                verdict = "reported, not judged" if self.target.startswith("report") else "not judged (smoke)"
            else:
                verdict = "**met**" if self.met else "**missed**"
            lines += ["", f"Target: {self.target} — {verdict}"]
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def alternate(impls: dict[str, Callable[[], None]], repeats: int, setup: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Run each implementation in turn, ``repeats`` rounds, timing only the call."""
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            if setup is not None:
                setup()
            gc.collect()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def run_probe(module: str, *args: str, timeout: float = 600) -> dict:
    """Run ``python -m benchmarks.<module> args`` in a fresh process; it prints one JSON line last."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"probe {module} {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def proc_io() -> dict[str, int]:
    values = {}
    with open("/proc/self/io") as f:
        for line in f:
            key, value = line.split(":")
            values[key.strip()] = int(value)
    return values


def rss_kib(field_name: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
