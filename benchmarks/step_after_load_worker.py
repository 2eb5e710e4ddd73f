"""One rank of the step-after-load case: ``torchrun --nproc_per_node=2 benchmarks/step_after_load_worker.py METHOD CKPT OUT``.

Every rank builds the checkpoint's llama on meta and shards it with FSDP2 (the baseline: resident set
read, high-water mark reset), fills it (``load``: ``CheckpointReader`` -> ``plan_checkpoint_load`` ->
``materialize`` -> ``load_checkpoint_into``, the reader closed, as ``HFCausalLM.configure_model`` does;
``init``: ``materialize`` -> ``init_weights_by_module``), then runs one validation step (eval, no grad,
2 x 256 tokens with labels). Recorded per rank, over the baseline: the fill's peak, the peak of fill +
step, and what stays resident after each; also ``/proc/self/smaps_rollup`` after the fill (anonymous
versus file-backed pages) and whether any checkpoint file is still mapped.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from benchmarks.load_worker import sharded_meta_model, status_kib, write_and_exit
from lightning_automodel.core.init import init_weights_by_module
from lightning_automodel.core.sharded_load import CheckpointReader, load_checkpoint_into, plan_checkpoint_load
from lightning_automodel.core.model_build import materialize


def smaps_rollup_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return {k: out.get(k, 0) for k in ("Rss", "Anonymous", "Shared_Clean", "Private_Clean")}


def mapped_files(root: str) -> list[str]:
    with open("/proc/self/maps") as f:
        return sorted({line.split()[-1] for line in f if root in line})


def fill(method: str, model, path: str) -> None:
    device = torch.device("cpu")
    if method == "load":
        reader = CheckpointReader(path)
        try:
            plan = plan_checkpoint_load(model, reader)
            materialize(model, device)
            load_checkpoint_into(model, reader, plan)
        finally:
            reader.close()
    elif method == "init":
        materialize(model, device)
        init_weights_by_module(model, seed=0)
    else:
        raise ValueError(f"unknown method {method!r}")


def measure(method: str, path: str, mesh) -> dict:
    rank = dist.get_rank()
    model = sharded_meta_model(path, mesh)
    gc.collect()
    dist.barrier()
    base = status_kib("VmRSS")["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    fill(method, model, path)
    gc.collect()
    filled = status_kib("VmHWM", "VmRSS")
    record = {"rank": rank, "method": method, "fill_peak_kib": filled["VmHWM"] - base, "after_fill_kib": filled["VmRSS"] - base,
              "smaps_after_fill_kib": smaps_rollup_kib(), "mapped_checkpoint_files": mapped_files(str(Path(path).resolve()))}
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 256), generator=torch.Generator().manual_seed(rank))
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    stepped = status_kib("VmHWM", "VmRSS")
    record.update(step_peak_kib=stepped["VmHWM"] - base, after_step_kib=stepped["VmRSS"] - base, loss=float(loss),
                  params=sum(p.numel() for p in model.parameters()))
    return record


def main() -> None:
    method, path, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    record = measure(method, path, mesh)
    records: list = [None] * world
    dist.all_gather_object(records, record)
    write_and_exit(out, records)


if __name__ == "__main__":
    main()
