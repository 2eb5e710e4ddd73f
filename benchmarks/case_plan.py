"""Case 7: `lightning-automodel plan` on a 70B-class config: wall time and peak memory."""

from __future__ import annotations

import json
import resource
import sys
import time

import yaml

from benchmarks.harness import WORK, CaseResult, Row, run_probe

LLAMA_70B = dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, intermediate_size=28672, vocab_size=128256)


def probe(config_path: str) -> None:
    import contextlib
    import io

    start = time.perf_counter()
    from lightning_automodel.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        main(["plan", "--config", config_path, "--world_size", "8"])
    print(json.dumps({"seconds": time.perf_counter() - start, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def run(smoke: bool, repeats: int) -> list[CaseResult]:
    WORK.mkdir(parents=True, exist_ok=True)
    cfg = WORK / "plan-70b.yaml"
    model = dict(LLAMA_70B, num_hidden_layers=4, hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2, vocab_size=1024) if smoke else LLAMA_70B
    cfg.write_text(yaml.safe_dump({
        "model": {"config": model},
        "trainer": {"devices": 8, "callbacks": [{"class_path": "lightning_automodel.callbacks.ParameterFreezing",
                                                  "init_args": {"freeze_modules": [{"glob": "model.layers.[0-9].*"}]}},
                                                 {"class_path": "lightning_automodel.callbacks.FreezeDeadParameters"}]},
    }))
    samples = [run_probe("case_plan", "probe", str(cfg)) for _ in range(repeats)]
    time_case = CaseResult("7. `plan` on a 70B-class llama config (whole process, imports included): wall time", target="under 10 s")
    time_case.rows = [Row("ours", [s["seconds"] for s in samples], "s")]
    mem_case = CaseResult("7. `plan` on a 70B-class llama config: peak resident memory", target="under 1 GB")
    mem_case.rows = [Row("ours", [s["maxrss"] for s in samples], "bytes")]
    if not smoke:
        time_case.met = time_case.rows[0].median < 10
        mem_case.met = mem_case.rows[0].median < 2**30
    return [time_case, mem_case]


if __name__ == "__main__" and sys.argv[1] == "probe":
    probe(sys.argv[2])
