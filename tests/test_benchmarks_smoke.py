"""The benchmarks run in smoke mode (tiny sizes, one repetition) so they never rot. No timing is asserted."""

import re
import subprocess
import sys

from distributed import REPO_ROOT


def test_benchmarks_smoke(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    for case in ("1. Freezing", "2. Checkpoint dtype inspection", "3. bf16 cast", "4. AdamW state", "5. Collating", "6. Seconds per training step", "7. `plan`"):
        assert case in text, case
    rows = re.findall(r"^\| (?!impl|---)(.+?) \| ([0-9.e+-]+) \|", text, flags=re.M)
    assert rows and all(float(value) >= 0 for _, value in rows)
