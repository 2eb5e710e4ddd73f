"""Case 2: checkpoint dtype inspection on a sharded safetensors checkpoint: time and bytes read.

Each measurement runs in a fresh process (``python -m benchmarks.case_dtypes_inspection probe IMPL DIR``)
so page-cache reads from one implementation do not flatter the other; page cache is dropped first
when the machine allows it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import WORK, CaseResult, Row, proc_io, run_probe


def write_checkpoint(root: Path, total_bytes: int, shards: int = 8) -> Path:
    from safetensors.torch import save_file

    marker = root / f"done-{total_bytes}"
    if marker.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    per_shard = total_bytes // shards
    per_tensor = max(per_shard // 16, 1024)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for t in range(16):
            dtype = torch.float32 if t == 0 else torch.bfloat16
            numel = per_tensor // (4 if dtype == torch.float32 else 2)
            tensors[f"layers.{s}.w{t}"] = torch.zeros(numel, dtype=dtype)
        save_file(tensors, str(root / name))
        weight_map.update({k: name for k in tensors})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    marker.write_text("ok")
    return root


def _drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def probe(impl: str, root: str) -> None:
    dropped = _drop_caches()
    if impl == "ours":
        from lightning_automodel.checkpoint_utils import _get_checkpoint_tensor_dtypes as fn

        args = (root, None)
    else:
        from transformers import AutoConfig

        from nemo_automodel.components.checkpoint.utils import _get_checkpoint_tensor_dtypes as fn

        args = (root, AutoConfig.for_model("llama"))
    before = proc_io()
    start = time.perf_counter()
    dtypes = fn(*args)
    elapsed = time.perf_counter() - start
    after = proc_io()
    print(json.dumps({
        "seconds": elapsed, "rchar": after["rchar"] - before["rchar"], "read_bytes": after["read_bytes"] - before["read_bytes"],
        "tensors": len(dtypes), "dropped": dropped,
    }))


def run(smoke: bool, repeats: int) -> list[CaseResult]:
    size = 20 * 2**20 if smoke else 2 * 2**30 + 2**20
    root = write_checkpoint(WORK / f"ckpt-{size}", size)
    samples: dict[str, list[dict]] = {"ours": [], "nemo-automodel 0.7.0": []}
    for _ in range(repeats):
        for impl in samples:
            samples[impl].append(run_probe("case_dtypes_inspection", "probe", "ours" if impl == "ours" else "ref", str(root)))
    time_case = CaseResult(f"2. Checkpoint dtype inspection, {size / 2**30:.2f} GiB in 8 safetensors shards: wall time", target="at least 10× faster")
    time_case.rows = [Row(k, [s["seconds"] for s in v], "s") for k, v in samples.items()]
    bytes_case = CaseResult("2. Checkpoint dtype inspection: bytes read (rchar + read_bytes)", target="under 1 MB read")
    bytes_case.rows = [Row(k, [s["rchar"] + s["read_bytes"] for s in v], "bytes") for k, v in samples.items()]
    if not smoke:
        time_case.met = time_case.rows[1].median >= 10 * time_case.rows[0].median
        bytes_case.met = bytes_case.rows[0].median < 2**20
    dropped = all(s["dropped"] for v in samples.values() for s in v)
    bytes_case.notes.append(
        "rchar counts read() syscalls; read_bytes counts storage reads. The reference's meta-device load memory-maps "
        "each shard, which neither counter fully shows. Page cache " + ("was dropped before each probe." if dropped else "could not be dropped (no permission).")
    )
    return [time_case, bytes_case]


if __name__ == "__main__" and sys.argv[1] == "probe":
    probe(sys.argv[2], sys.argv[3])
