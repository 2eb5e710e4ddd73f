"""Load + one step against random init + the same step, per rank on 2 FSDP2 ranks (issue 18 item 5).

A load must leave nothing resident (reader, memory maps, plan, host copies): the first step after it
should cost what it costs after a random init. Each measurement is a fresh ``torchrun --nproc_per_node=2``
of ``benchmarks/step_after_load_worker.py`` (gloo, CPU), methods alternating. The model is a
tiny-config-but-wide llama (about 1.1 GiB in fp32), saved by ``save_pretrained`` in fp32 and in bf16
(a hub checkpoint is bf16: every row then goes through the loader's cast buffer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.case_load import _free_port
from benchmarks.harness import REPO, WORK, CaseResult, Row

TARGET = 1.1
FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=3, vocab_size=32000)
SMOKE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=4000)
DTYPES = ("float32", "bfloat16")


def checkpoint(smoke: bool, dtype: str) -> Path:
    """The llama (seed 0) saved once per shape and dtype under ``benchmarks/_work``."""
    shape = SMOKE if smoke else FULL
    root = WORK / ("step-llama-" + "-".join(str(v) for v in shape.values()) + f"-{dtype}")
    if (root / "config.json").exists():
        return root
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**shape, num_attention_heads=16 if not smoke else 4, num_key_value_heads=16 if not smoke else 4,
                         tie_word_embeddings=False, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(root, max_shard_size="400MB")  # config.json is written last-ish; checked above
    return root


def run_worker(method: str, root: Path) -> list[dict]:
    drop_env = {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        out = Path(tmp) / "records.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", str(REPO / "benchmarks" / "step_after_load_worker.py"), method, str(root), str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env, cwd=REPO)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"step-after-load worker {method} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def run(smoke: bool, repeats: int) -> list[CaseResult]:
    WORK.mkdir(parents=True, exist_ok=True)
    mib = 1024  # records are in KiB
    results = []
    for dtype in DTYPES[:1] if smoke else DTYPES:
        root = checkpoint(smoke, dtype)
        samples: dict[str, list[list[dict]]] = {"load": [], "init": []}
        for _ in range(max(1, min(repeats, 3))):
            for method in samples:  # alternating, a fresh pair of processes each
                samples[method].append(run_worker(method, root))
        params = samples["load"][0][0]["params"]
        result = CaseResult(
            f"Load ({dtype} checkpoint) + one validation step against random init + the same step, {params / 1e6:.0f}M-parameter "
            f"llama (fp32 weights), FSDP2 on 2 gloo ranks, per rank" + (" (smoke)" if smoke else ""),
            ours="load", target=f"per-rank peak of load + step at most {TARGET} × that of random init + step",
        )
        for key, metric in (("step_peak_kib", "peak of fill + step over baseline (max over ranks)"),
                            ("fill_peak_kib", "peak of the fill alone (max over ranks)"),
                            ("after_fill_kib", "resident after the fill (max over ranks)"),
                            ("after_step_kib", "resident after the step (max over ranks)")):
            for method, runs in samples.items():
                result.rows.append(Row(method, [max(r[key] for r in run) / mib for run in runs], "MiB", metric=metric))
        load_peak, init_peak = (result.rows[i].median for i in (0, 1))
        result.met = None if smoke else load_peak <= TARGET * init_peak
        mapped = sorted({f for run in samples["load"] for r in run for f in r["mapped_checkpoint_files"]})
        smaps = samples["load"][0][0]["smaps_after_fill_kib"]
        result.notes.append(
            f"Ratio load / init of the fill + step peak: {load_peak / init_peak:.2f} (medians of {len(samples['load'])} fresh launches each). "
            f"Checkpoint files still mapped after the load: {', '.join(mapped) if mapped else 'none'}; rank 0's smaps_rollup after "
            f"the load (whole process, baseline included): {smaps['Anonymous'] / mib:.0f} MiB anonymous, "
            f"{(smaps['Shared_Clean'] + smaps['Private_Clean']) / mib:.0f} MiB clean file pages (the interpreter's and libraries' code)."
        )
        result.notes.append(
            "Baseline: each rank's VmRSS after every import, the meta build and `apply_fsdp2`; peaks are VmHWM − baseline "
            "(`clear_refs` reset at the baseline). The step gathers each FSDP2 unit in turn (the norm + head unit stays gathered "
            "until backward), so most of the step's cost is the gathered weights, the same after either fill."
        )
        results.append(result)
    return results
