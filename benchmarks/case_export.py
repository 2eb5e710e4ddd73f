"""Case 9: export of a 0.8 GB model at real size, and HuggingFaceCheckpoint against a plain DCP save.

Export: a training checkpoint of the case-8 llama (fp32 weights, AdamW state of the same size
twice, so 3× the model on disk) is written once as a single ``.ckpt`` and once as a DCP directory,
in Lightning's layout. Each method then exports it to 100 MB shards in a fresh process:

* ``ours`` (``lightning-automodel export``) from the ``.ckpt`` and from the DCP directory;
* ``previous``: the export of commit 5fb7031 (whole checkpoint loaded, every tensor cloned), ``.ckpt``;
* ``dcp_to_torch_save + save_pretrained``: torch's consolidation to one file, then transformers.

Peak = VmHWM − VmRSS after imports, in MiB, against the bound (output shard + largest tensor).

HuggingFaceCheckpoint: 2 gloo ranks shard the same llama with FSDP2 and save it (a) with
``dcp.save`` of the model state dict (what a sharded Lightning checkpoint writes for the model)
and (b) in the hub layout from both ranks; per rank seconds and peak memory.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.case_load import checkpoint as hf_checkpoint
from benchmarks.harness import REPO, WORK, CaseResult, Row, run_probe

METHODS = {  # label -> (worker method, source kind)
    "ours (.ckpt)": ("ours", "ckpt"),
    "ours (DCP)": ("ours", "dcp"),
    "previous export (.ckpt)": ("previous", "ckpt"),
    "dcp_to_torch_save + save_pretrained (DCP)": ("dcp_to_torch_save", "dcp"),
}
PREVIOUS_COMMIT = "5fb7031"
#: Imports of the snapshot whose modules moved since (issue 20): same functions, new places.
SNAPSHOT_IMPORTS = {
    "from lightning_automodel.models.building import build_on_meta":
        "from lightning_automodel.core.model_build import build_meta_model as build_on_meta",
}


def write_training_checkpoints(hf_dir: str, out_dir: str) -> None:
    """A Lightning-layout training checkpoint of the model in ``hf_dir``: ``train.ckpt`` and ``train-dcp/``."""
    import torch
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    from lightning_automodel.core.hub_layout import EXPORT_INFO_KEY, hub_model_info

    out = Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    optimizer = {"state": {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn(v.shape, generator=g) * 1e-3,
                               "exp_avg_sq": torch.rand(v.shape, generator=g) * 1e-6}
                           for i, v in enumerate(state.values())},
                 "param_groups": [{"lr": 1e-4, "params": list(range(len(state)))}]}
    meta = {"epoch": 0, "global_step": 10, "hyper_parameters": {"pretrained_path": hf_dir},
            EXPORT_INFO_KEY: hub_model_info("model.", model, hf_dir).to_dict()}
    torch.save({"state_dict": state, "optimizer_states": [optimizer], **meta}, out / "train.ckpt")
    dcp.save({"state_dict": state, "optimizer_0": optimizer}, checkpoint_id=str(out / "train-dcp"), no_dist=True)
    torch.save(meta, out / "train-dcp" / "meta.pt")
    sizes = {k: v.numel() * v.element_size() for k, v in state.items()}
    largest = max(sizes, key=sizes.__getitem__)
    info = {"model_bytes": sum(sizes.values()), "largest": largest, "largest_bytes": sizes[largest],
            "ckpt_bytes": (out / "train.ckpt").stat().st_size}
    (out / "bench-meta.json").write_text(json.dumps(info))
    print(json.dumps(info))


def sources(smoke: bool) -> Path:
    hf = hf_checkpoint(smoke)
    root = WORK / f"export-{hf.name}"
    if not (root / "bench-meta.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        run_probe("case_export", "write", str(hf), str(root), timeout=3600)
    text = subprocess.run(["git", "show", f"{PREVIOUS_COMMIT}:lightning_automodel/export.py"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout
    for old_import, new_import in SNAPSHOT_IMPORTS.items():  # the snapshot runs against today's package
        text = text.replace(old_import, new_import)
    (WORK / "previous_export.py").write_text(text)
    return root


def run_export(method: str, source: Path, warm: Path, shard: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.export_worker", method, str(source), str(warm), str(Path(tmp) / "out"), shard,
               str(result)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"export worker {method} failed:\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def run_save_worker(smoke: bool, hub_first: bool = False) -> dict[str, list[dict]]:
    hf = hf_checkpoint(smoke)
    env = {k: v for k, v in os.environ.items() if k not in {"MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"}}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
               str(REPO / "benchmarks" / "hf_save_worker.py"), str(hf), tmp, "200MB", "hub-first" if hub_first else "dcp-first"]
        for attempt in range(2):  # one retry, reported on stderr: a shared machine, and gloo's teardown race
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env, cwd=REPO)
            if proc.returncode == 0:
                return json.loads((Path(tmp) / "records.json").read_text())
            print(f"save worker failed ({proc.returncode}), attempt {attempt + 1}:\n{proc.stderr[-2000:]}", file=sys.stderr)
        raise RuntimeError(f"save worker failed twice:\n{proc.stderr[-3000:]}")


def run(smoke: bool, repeats: int) -> list[CaseResult]:
    root = sources(smoke)
    meta = json.loads((root / "bench-meta.json").read_text())
    shard = "1MB" if smoke else "100MB"
    shard_bytes = 10**6 if smoke else 100 * 10**6
    small = sources(True)
    src = {"ckpt": root / "train.ckpt", "dcp": root / "train-dcp"}
    warm = {"ckpt": small / "train.ckpt", "dcp": small / "train-dcp"}
    samples: dict[str, list[dict]] = {label: [] for label in METHODS}
    for _ in range(repeats):
        for label, (method, kind) in METHODS.items():  # alternating, a fresh process per measurement
            samples[label].append(run_export(method, src[kind], warm[kind], shard))
    mib = 2**20
    bound = shard_bytes + meta["largest_bytes"]
    mem = CaseResult(
        f"9. Export of a {meta['model_bytes'] / 2**30:.2f} GiB fp32 llama (training checkpoint {meta['ckpt_bytes'] / 2**30:.2f} GiB "
        f"with AdamW state) to {shard} shards: peak memory and time" + (" (smoke)" if smoke else ""),
        ours="ours (.ckpt)", target="peak at most 1.3 × (output shard + largest tensor), from .ckpt and from DCP",
    )
    for label, runs in samples.items():
        mem.rows.append(Row(label, [r["peak_kib"] * 1024 / mib for r in runs], "MiB", metric="peak over baseline"))
    for label, runs in samples.items():
        mem.rows.append(Row(label, [r["peak_kib"] * 1024 / bound for r in runs], "× bound", metric="peak / (shard + largest)"))
    for label, runs in samples.items():
        mem.rows.append(Row(label, [r["seconds"] for r in runs], "s", metric="wall time"))
    mem.notes.append(f"Bound: output shard {shard_bytes / mib:.0f} MiB + largest tensor {meta['largest']} "
                     f"{meta['largest_bytes'] / mib:.0f} MiB = {bound / mib:.0f} MiB; target {1.3 * bound / mib:.0f} MiB.")
    mem.notes.append("Peak = VmHWM − VmRSS after imports (file pages mapped by a reader count, as anonymous memory does); "
                     "each measurement in a fresh process, methods alternating.")
    if not smoke:
        mem.met = all(statistics.median(r["peak_kib"] * 1024 for r in samples[label]) <= 1.3 * bound
                      for label in ("ours (.ckpt)", "ours (DCP)"))

    records = [run_save_worker(smoke) for _ in range(max(1, repeats))]
    save = CaseResult("9. HuggingFaceCheckpoint (hub layout, both ranks write) against a plain DCP save of the model, 2 FSDP2 ranks",
                      ours="HuggingFaceCheckpoint", target="report: per rank seconds and peak memory")
    for label in ("plain DCP save", "HuggingFaceCheckpoint"):
        save.rows.append(Row(label, [max(x["seconds"] for x in run[label]) for run in records], "s", metric="slowest rank"))
    for label in ("plain DCP save", "HuggingFaceCheckpoint"):
        save.rows.append(Row(label, [max(x["peak_kib"] for x in run[label]) / 1024 for run in records], "MiB", metric="peak over baseline, max rank"))
    save.notes.append("200 MB output shards. The DCP save writes each rank's shard as is; HuggingFaceCheckpoint all-gathers one "
                      "conversion group at a time and each rank writes every second file (bound per rank: one output shard + one "
                      "gathered tensor).")
    return [mem, save]


if __name__ == "__main__" and sys.argv[1] == "write":
    write_training_checkpoints(sys.argv[2], sys.argv[3])
