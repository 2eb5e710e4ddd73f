"""Case 7: ``lightning-automodel plan`` on a 70B-class config, and on a 100,000-layer config: wall time and peak memory.

Each measurement runs the installed console script as a child of a fresh probe process, exactly as a
user would type it, and reads the child's peak resident set from ``getrusage(RUSAGE_CHILDREN)``; the
probe has no other children, so that maximum is the command's own.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.harness import WORK, CaseResult, Row, run_probe

LLAMA_70B = dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, intermediate_size=28672, vocab_size=128256)
SMOKE = dict(LLAMA_70B, num_hidden_layers=4, hidden_size=512, intermediate_size=1024, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=1024)


def command() -> list[str]:
    script = Path(sys.executable).with_name("lightning-automodel")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lightning_automodel.cli"]


def run_child(cmd: list[str], what: str) -> tuple[float, int, str]:
    """Wall time, peak RSS (the probe's only child, so RUSAGE_CHILDREN's maximum is its own) and stdout."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, proc.stdout


def probe(config_path: str) -> None:
    elapsed, maxrss, stdout = run_child([*command(), "plan", "--config", config_path, "--world_size", "8"], "plan")
    print(json.dumps({"seconds": elapsed, "maxrss": maxrss, "stdout_lines": len(stdout.splitlines())}))


def write_config(smoke: bool) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / ("plan-smoke.yaml" if smoke else "plan-70b.yaml")
    path.write_text(yaml.safe_dump({
        "model": {"config": SMOKE if smoke else LLAMA_70B},
        "trainer": {"devices": 8, "callbacks": [
            {"class_path": "lightning_automodel.callbacks.ParameterFreezing",
             "init_args": {"freeze_modules": [{"glob": "model.layers.[0-9].*"}]}},
            {"class_path": "lightning_automodel.callbacks.FreezeDeadParameters"},
        ]},
    }))
    return path


def run(smoke: bool, repeats: int) -> list[CaseResult]:
    cfg = write_config(smoke)
    samples = [run_probe("case_plan", "probe", str(cfg)) for _ in range(repeats)]
    what = "a tiny llama config (smoke)" if smoke else "a 70B-class llama config, 8 ranks, a glob freeze and dead-parameter rules"
    time_case = CaseResult(f"7. `lightning-automodel plan` on {what}: wall time of the command (start-up and imports included)",
                           target="under 10 s")
    time_case.rows = [Row("ours", [s["seconds"] for s in samples], "s")]
    mem_case = CaseResult("7. `lightning-automodel plan`: peak resident memory of the command (ru_maxrss of the child)",
                          target="under 1 GB (10^9 bytes)")
    mem_case.rows = [Row("ours", [s["maxrss"] for s in samples], "bytes")]
    mem_case.notes.append(f"The plan printed {samples[0]['stdout_lines']} lines. No peer: the reference has no dry-run planner.")
    if not smoke:
        time_case.met = time_case.rows[0].median < 10
        mem_case.met = mem_case.rows[0].median < 1e9
    return [time_case, mem_case]


if __name__ == "__main__" and sys.argv[1] == "probe":
    probe(sys.argv[2])
