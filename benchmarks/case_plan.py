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


DEEP = dict(model_type="llama", vocab_size=256, hidden_size=16, intermediate_size=32, num_attention_heads=4,
            num_key_value_heads=2, head_dim=4, num_hidden_layers=100_000)

# The peer: the same planner with every decoder layer constructed by transformers (what plan did before
# layer replication), so the ratio isolates the copies.
_PLANNER = """
import sys
from lightning_automodel import planning
from lightning_automodel.models import building
if sys.argv[1] == "constructor":
    real = building.build_on_meta
    def every_layer(*args, **kwargs):
        kwargs.pop("replication", None)
        return real(*args, **kwargs)
    building.build_on_meta = every_layer
sys.exit(planning.main(["--config", sys.argv[2]]))
"""


def probe_deep(config_path: str, mode: str) -> None:
    elapsed, maxrss, stdout = run_child([sys.executable, "-c", _PLANNER, mode, config_path], f"plan ({mode})")
    print(json.dumps({"seconds": elapsed, "maxrss": maxrss, "stdout": stdout}))


def write_deep_config(smoke: bool) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / ("plan-deep-smoke.yaml" if smoke else "plan-deep.yaml")
    path.write_text(yaml.safe_dump({
        "model": {"config": dict(DEEP, num_hidden_layers=200) if smoke else DEEP},
        "trainer": {"callbacks": [
            {"class_path": "lightning_automodel.callbacks.ParameterFreezing",
             "init_args": {"freeze_modules": [{"path": "model.layers.0.mlp"}]}},
            {"class_path": "lightning_automodel.callbacks.FreezeDeadParameters"},
        ]},
    }))
    return path


def run_deep(smoke: bool, repeats: int) -> list[CaseResult]:
    cfg = write_deep_config(smoke)
    rounds = 1 if smoke else min(repeats, 2)  # the peer takes a minute or more per run
    samples: dict[str, list[dict]] = {"ours": [], "every layer constructed": []}
    for _ in range(rounds):
        samples["ours"].append(run_probe("case_plan", "probe_deep", str(cfg), "replicated", timeout=1800))
        samples["every layer constructed"].append(run_probe("case_plan", "probe_deep", str(cfg), "constructor", timeout=1800))
    layers = 200 if smoke else DEEP["num_hidden_layers"]
    same = samples["ours"][0]["stdout"] == samples["every layer constructed"][0]["stdout"]
    case = CaseResult(f"7. `plan` on a {layers:,}-layer llama config (a freeze and the dead-parameter rules): "
                      "proven layer copies against constructing every layer", target="under 30 s and 3 GB")
    for name, runs in samples.items():
        case.rows.append(Row(name, [r["seconds"] for r in runs], "s", "wall time"))
        case.rows.append(Row(name, [r["maxrss"] for r in runs], "bytes", "peak RSS"))
    case.notes.append("Both print the same plan: " + ("yes." if same else "**no**."))
    modules, tensors = 13 * layers, 9 * layers
    case.notes.append(f"Each run is one process (imports included, about 3.5 s). What remains is Python's per-object "
                      f"cost: {modules:,} modules and {tensors:,} parameter tensors pass through transformers' "
                      "tie_weights, the freeze index, the counts, the memory estimate and the table.")
    if not smoke:
        ours = case.ours_row("wall time")
        memory = case.ours_row("peak RSS")
        case.met = same and ours is not None and memory is not None and ours.median < 30 and memory.median < 3e9
    return [case]


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
    return [time_case, mem_case, *run_deep(smoke, repeats)]


if __name__ == "__main__" and sys.argv[1] == "probe":
    probe(sys.argv[2])
if __name__ == "__main__" and sys.argv[1] == "probe_deep":
    probe_deep(sys.argv[2], sys.argv[3])
