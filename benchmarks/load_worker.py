"""One rank of the load case (``benchmarks/case_load.py``): ``torchrun --nproc_per_node=2 benchmarks/load_worker.py METHOD[,METHOD...] CKPT WARMUP_CKPT OUT [drop-cache|keep-cache] [sample]``.

Every rank imports everything, joins a gloo group, runs METHOD once on a few-MB checkpoint of the same
architecture (so lazy imports and first-call set-up are not measured), builds the fp32 llama on meta and shards it with
FSDP2 (``apply_fsdp2`` on a 1-D mesh of all ranks). That is the baseline: the resident set is read,
the high-water mark is reset (``echo 5 > /proc/self/clear_refs``), the page cache is dropped if asked,
and then one METHOD materializes the shards and fills them from the checkpoint:

* ``ours``: ``CheckpointReader`` -> ``plan_checkpoint_load`` -> ``materialize`` -> ``load_checkpoint_into``.
* ``previous``: the full-load path this package had before ``core.sharded_load`` (commit 47b85eb:
  ``load_full_state_dict`` + ``materialize_and_load``), reproduced below: every rank reads every tensor
  and cuts its shard with ``distribute_tensor(src_data_rank=None)``.
* ``rank0``: ``from_pretrained`` (fp32) on rank 0 only, then ``set_model_state_dict(..., full_state_dict=True,
  broadcast_from_rank0=True)``; the other ranks pass ``{}``.
* ``hf_reader``: ``dcp.load(model.state_dict(), storage_reader=HuggingFaceStorageReader(path))``.

Measured per rank: peak resident set over the baseline (VmHWM − baseline VmRSS), wall time, bytes
requested (each method's own count) and ``/proc/self/io`` (rchar, read_bytes) as a cross-check. After the
measurement, outside it, rank 0 checks a few ``.full_tensor()`` against the safetensors file and every
rank adds its shards to a float64 checksum that is all-reduced and compared with the file's.
Rank 0 writes ``{method: [every rank's record]}`` to OUT as JSON.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import AutoConfig, AutoModelForCausalLM

from lightning_automodel.core.hf_weight_files import resolve_checkpoint_files
from lightning_automodel.core.sharded_load import CheckpointReader, load_checkpoint_into, plan_checkpoint_load
from lightning_automodel.core.model_build import apply_fsdp2, build_meta_model, materialize


def status_kib(*fields: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in fields:
                out[key] = int(line.split()[1])
    return out


def proc_io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k.strip(): int(v) for k, v in (line.split(":") for line in f)}


class Sampler(threading.Thread):
    """Optional (profiling only, not in the timed repetitions): RssAnon / RssFile every 5 ms, and the split at the peak."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.done = threading.Event()
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.max_anon = self.max_file = 0

    def run(self) -> None:
        while not self.done.wait(0.005):
            s = status_kib("VmRSS", "RssAnon", "RssFile")
            if s["VmRSS"] > self.peak["VmRSS"]:
                self.peak = s
            self.max_anon = max(self.max_anon, s["RssAnon"])
            self.max_file = max(self.max_file, s["RssFile"])


# ---- the previous full-load path (47b85eb:lightning_automodel/models/building.py), verbatim but for the tied-head fill ----

def load_full_state_dict(path) -> dict[str, torch.Tensor]:
    """Every tensor of a local checkpoint (safetensors memory-mapped, ``.bin`` on CPU)."""
    state: dict[str, torch.Tensor] = {}
    for file in resolve_checkpoint_files(path):
        if file.suffix == ".safetensors":
            state.update(load_file(str(file)))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


@torch.no_grad()
def materialize_and_load(model, state_dict: dict[str, torch.Tensor], device: torch.device) -> None:
    """Allocate a (sharded) meta model on ``device`` and copy a full state dict into it, shard by shard.

    (The old version also filled a tied head missing from the state dict from the embedding; this llama
    is untied and its file has every tensor, so that step had nothing to do and is left out.)
    """
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers() if not buf.is_meta}
    model.to_empty(device=device)
    for name, buf in model.named_buffers():
        if name in buffers:
            buf.copy_(buffers[name])
    state_dict = dict(state_dict)
    missing = []
    for name, param in model.named_parameters(remove_duplicate=False):
        key = name.replace("_checkpoint_wrapped_module.", "")
        full = state_dict.get(key)
        if full is None:
            missing.append(key)
            continue
        if tuple(full.shape) != tuple(param.shape):
            raise ValueError(f"Checkpoint tensor {key} has shape {list(full.shape)}, the model expects {list(param.shape)}.")
        full = full.to(device=device, dtype=param.dtype)
        if isinstance(param, DTensor):
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)
    if missing:
        raise KeyError(f"The checkpoint has no tensor for {missing[:5]}{' ...' if len(missing) > 5 else ''}.")


class CountingHFReader(HuggingFaceStorageReader):
    """``HuggingFaceStorageReader`` that adds up the bytes of every slice it reads (as stored on disk)."""

    bytes_read = 0

    def _process_read_request(self, f, req, planner) -> None:
        numel = 1
        for n in req.lengths:
            numel *= int(n)
        self.bytes_read += numel * self.storage_data[req.storage_index].dtype.itemsize
        super()._process_read_request(f, req, planner)


def load(method: str, model, path: str, device: torch.device, checkpoint_bytes: int = 0) -> int:
    """Materialize ``model``'s shards and fill them; returns the bytes this rank asked for."""
    if method == "ours":
        reader = CheckpointReader(path)
        try:
            plan = plan_checkpoint_load(model, reader)
            materialize(model, device)
            report = load_checkpoint_into(model, reader, plan)
        finally:
            reader.close()
        return report.bytes_read
    if method == "previous":
        state = load_full_state_dict(path)
        asked = sum(t.numel() * t.element_size() for t in state.values())
        materialize_and_load(model, state, device)
        del state
        return asked
    if method == "rank0":
        materialize(model, device)
        asked = 0
        full_sd: dict[str, torch.Tensor] = {}
        if dist.get_rank() == 0:
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
            full_sd = hf.state_dict()
            asked = checkpoint_bytes  # from_pretrained reads every tensor
        set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full_sd
        if dist.get_rank() == 0:
            del hf
        return asked
    if method == "hf_reader":
        materialize(model, device)
        reader = CountingHFReader(path)
        dcp.load(model.state_dict(), storage_reader=reader)
        return reader.bytes_read
    raise ValueError(f"unknown method {method!r}")


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


@torch.no_grad()
def verify(model, path: str, checks: list[str], expected_sum: float) -> dict:
    """Outside the measurement: a few full tensors equal the file (rank 0), and every shard adds up to the file's sum."""
    params = dict(model.named_parameters())
    equal: dict[str, bool] = {}
    files = {}
    for file in resolve_checkpoint_files(path):
        with safe_open(str(file), framework="pt") as f:
            files.update({k: file for k in f.keys()})
    for key in checks:
        full = params[key].full_tensor() if isinstance(params[key], DTensor) else params[key]  # collective
        if dist.get_rank() == 0:
            with safe_open(str(files[key]), framework="pt") as f:
                equal[key] = bool(torch.equal(full, f.get_tensor(key).to(full.dtype)))
        del full
    local = torch.zeros((), dtype=torch.float64)
    for p in params.values():
        t = p.to_local() if isinstance(p, DTensor) else p
        local += t.double().sum()
    dist.all_reduce(local)
    total = float(local)
    return {"equal": equal, "sum": total, "sum_ok": abs(total - expected_sum) <= 1e-9 * max(1.0, abs(expected_sum)) + 1e-6}


def sharded_meta_model(path: str, mesh):
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = build_meta_model(config, "causal_lm", dtype=torch.float32)
    apply_fsdp2(model, mesh)
    return model


def measure(method: str, path: str, warm: str, mesh, meta: dict, drop: bool, sample: bool) -> dict:
    """Warm up on a tiny checkpoint, build and shard on meta (the baseline), then one measured load."""
    rank = dist.get_rank()
    device = torch.device("cpu")
    # Lazy imports and first-call set-up (transformers' conversion rules, DCP planners, from_pretrained's
    # machinery) happen here, on a few-MB checkpoint, so the measured load reads and allocates only for the weights.
    load(method, sharded_meta_model(warm, mesh), warm, device)
    gc.collect()
    model = sharded_meta_model(path, mesh)
    dist.barrier()
    dropped = drop_page_cache() if drop and rank == 0 else False
    dist.barrier()

    sampler = Sampler() if sample else None
    base = status_kib("VmRSS")["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    io0, faults0 = proc_io(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    if sampler:
        sampler.start()
    start = time.perf_counter()
    asked = load(method, model, path, device, meta["checkpoint_bytes"])
    seconds = time.perf_counter() - start
    if sampler:
        sampler.done.set()
        sampler.join()
    io1, faults1 = proc_io(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    end = status_kib("VmHWM", "VmRSS", "RssAnon", "RssFile")
    record = {
        "rank": rank, "method": method, "seconds": seconds, "bytes_read": asked,
        "base_kib": base, "peak_kib": end["VmHWM"] - base, "after_kib": end["VmRSS"] - base,
        "rss_anon_after_kib": end["RssAnon"], "rss_file_after_kib": end["RssFile"],
        "rchar": io1["rchar"] - io0["rchar"], "read_bytes": io1["read_bytes"] - io0["read_bytes"],
        "majflt": faults1 - faults0, "dropped": dropped, "threads": torch.get_num_threads(),
    }
    if sampler:
        record["sampled_peak_kib"] = sampler.peak
        record["sampled_max_anon_kib"] = sampler.max_anon
        record["sampled_max_file_kib"] = sampler.max_file
    record["verify"] = verify(model, path, meta["checks"], meta["sum"])
    del model
    return record


def main() -> None:
    """METHOD may be a comma-separated list (smoke mode: one launch, the methods in turn, each on a new meta model)."""
    methods, path, warm, out = sys.argv[1].split(","), sys.argv[2], sys.argv[3], Path(sys.argv[4])
    drop = len(sys.argv) > 5 and sys.argv[5] == "drop-cache"
    sample = len(sys.argv) > 6 and sys.argv[6] == "sample"
    meta = json.loads((Path(path) / "bench-meta.json").read_text())
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    results = {}
    for method in methods:
        record = measure(method, path, warm, mesh, meta, drop, sample)
        records: list = [None] * world
        dist.all_gather_object(records, record)
        results[method] = records
    write_and_exit(out, results)


def write_and_exit(out: Path, results: object) -> None:
    """Rank 0 writes ``results`` as JSON; every rank leaves the group and exits without finalization.

    Skips interpreter finalization: on this machine a gloo rank aborted there now and then ("terminate called
    without an active exception", no Python frame, after the results were written), a known torch teardown race.
    """
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
