"""The benchmarks run in smoke mode (tiny sizes, one repetition) so they never rot.

Asserts only that every case ran and produced numbers; never a timing.
"""

import os
import re
import subprocess
import sys

import pytest
from distributed import REPO_ROOT

CASES = {1: "setup surgery", 2: "checkpoint dtype inspection", 3: "bf16 cast", 4: "AdamW state",
         5: "collating", 6: "seconds per training step", 7: "plan", 8: "sharded checkpoint load"}


def sections(text: str) -> dict[str, str]:
    """Markdown heading -> its body, for every ``### N. ...`` result."""
    parts = re.split(r"^### ", text, flags=re.M)[1:]
    return {part.splitlines()[0]: part for part in parts}


def numeric_medians(body: str) -> list[float]:
    """The median column of every data row of the section's table."""
    medians = []
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or cells[0] in ("impl", "") or set(cells[0]) <= {"-"}:
            continue
        # | impl | [metric |] median | spread | unit | ratio |: the median is 4th from the end.
        medians.append(float(cells[-4]))
    return medians


def test_benchmarks_smoke(tmp_path):
    pytest.importorskip("nemo_automodel")
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = sections(out.read_text())
    for number, what in CASES.items():
        ours = {title: body for title, body in found.items() if title.startswith(f"{number}. ")}
        assert ours, f"case {number} ({what}) produced no result"
        for title, body in ours.items():
            medians = numeric_medians(body)
            assert medians, f"{title}: no numbers"
            assert all(m == m and m >= 0 for m in medians), f"{title}: {medians}"
