"""Case 2: checkpoint dtype inspection on a sharded safetensors checkpoint: time and bytes read.

Each measurement runs in a fresh process (``python -m benchmarks.case_dtypes_inspection probe IMPL DIR WARMUP_DIR drop-cache|keep-cache``)
so page-cache reads from one implementation do not flatter the other; the page cache is dropped first
when the machine allows it (not in smoke mode: the smoke run is a test on a shared machine, and
dropping every process's cache is no test's business).
"""

from __future__ import annotations

import hashlib
import json
import resource
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


def probe(impl: str, root: str, warm: str, drop: bool) -> None:
    if impl == "ours":
        from lightning_automodel.checkpoint_utils import _get_checkpoint_tensor_dtypes as fn

        args = (root, None)
    else:
        from transformers import AutoConfig

        from nemo_automodel.components.checkpoint.utils import _get_checkpoint_tensor_dtypes as fn

        args = (root, AutoConfig.for_model("llama"))
    fn(warm, *args[1:])  # lazy imports happen here, so the measured call reads only the checkpoint
    dropped = drop and _drop_caches()
    before, faults = proc_io(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    start = time.perf_counter()
    dtypes = fn(*args)
    elapsed = time.perf_counter() - start
    after = proc_io()
    digest = hashlib.sha256(repr(sorted((k, str(v)) for k, v in dtypes.items())).encode()).hexdigest()
    print(json.dumps({
        "seconds": elapsed, "rchar": after["rchar"] - before["rchar"], "read_bytes": after["read_bytes"] - before["read_bytes"],
        "majflt": resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults, "tensors": len(dtypes), "dropped": dropped,
        "digest": digest, "fp32": sum(1 for v in dtypes.values() if v == torch.float32),
    }))


def run(smoke: bool, repeats: int) -> list[CaseResult]:
    size = 20 * 2**20 if smoke else 2 * 2**30 + 2**20
    root = write_checkpoint(WORK / f"ckpt-{size}", size)
    warm = write_checkpoint(WORK / "ckpt-warmup", 2**20)
    samples: dict[str, list[dict]] = {"ours": [], "nemo-automodel 0.7.0": []}
    for _ in range(repeats):
        for impl in samples:
            samples[impl].append(run_probe("case_dtypes_inspection", "probe", "ours" if impl == "ours" else "ref", str(root), str(warm),
                                             "keep-cache" if smoke else "drop-cache"))
    time_case = CaseResult(f"2. Checkpoint dtype inspection, {size / 2**30:.2f} GiB in 8 safetensors shards: wall time", target="at least 10× faster")
    time_case.rows = [Row(k, [s["seconds"] for s in v], "s") for k, v in samples.items()]
    bytes_case = CaseResult("2. Checkpoint dtype inspection: bytes read", target="under 1 MB read (the larger of rchar and read_bytes)")
    for key, label in (("rchar", "rchar (read() syscalls)"), ("read_bytes", "read_bytes (from storage)"),
                       ("majflt", "major page faults (mmap reads)")):
        for impl, values in samples.items():
            bytes_case.rows.append(Row(impl, [s[key] for s in values], "faults" if key == "majflt" else "bytes", metric=label))
    if not smoke:
        time_case.met = time_case.rows[1].median >= 10 * time_case.rows[0].median
        bytes_case.met = max(bytes_case.rows[0].median, bytes_case.rows[2].median) < 10**6
    dropped = all(s["dropped"] for v in samples.values() for s in v)
    digests = {s["digest"] for v in samples.values() for s in v}
    first = samples["ours"][0]
    time_case.notes.append(
        f"Both return the same {first['tensors']} tensor dtypes ({first['fp32']} fp32 among bf16): "
        f"{'yes' if len(digests) == 1 else '**no**'}. Each measurement is a fresh process that first inspects a "
        "separate 1 MiB checkpoint (so lazy imports are not counted)"
        + (", after dropping the page cache (`echo 3 > /proc/sys/vm/drop_caches`)." if dropped else "; the page cache was not dropped (smoke mode, or no permission), so storage reads may be hidden.")
    )
    bytes_case.notes.append(
        "rchar counts bytes requested through read() syscalls, cached or not; read_bytes counts bytes the process caused to be "
        "fetched from storage, which (with the cache dropped) includes pages faulted in through mmap. The reference's "
        "meta-device load opens each shard with safetensors' mmap, which rchar does not see; the major-fault row shows it."
    )
    return [time_case, bytes_case]


if __name__ == "__main__" and sys.argv[1] == "probe":
    probe(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "drop-cache")
