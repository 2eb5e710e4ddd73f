"""One rank of case 9's save comparison: ``torchrun --nproc_per_node=2 benchmarks/hf_save_worker.py HF_DIR TMP SHARD [hub-first]``.

Every rank builds the llama from ``HF_DIR`` on meta, shards it with FSDP2, loads its shards, and
then measures, each from a reset high-water mark: (a) ``dcp.save`` of the model state dict and
(b) the hub-layout save of ``HuggingFaceCheckpoint`` (``write_hub_files`` inside ``write_published``).
Rank 0 writes ``{label: [every rank's record]}`` to ``TMP/records.json``.

Both saves start from the same state: each writes a fresh directory, and every earlier output is
deleted before each measurement (outside the timing). On this VM, writing into page cache that was
just freed is ~10× faster than into fresh memory (100 MB: 0.05 s against 0.6-0.9 s), so a save that
overwrote its previous files in place (DCP with the same ``checkpoint_id``, which truncates them
first) while the other wrote a new directory measured the memory, not the save. ``hub-first``
measures the hub save first (the case alternates the order over its repetitions).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoConfig

from benchmarks.harness import reset_peak_rss, rss_kib
from lightning_automodel.core.hub_layout import hub_model_info
from lightning_automodel.core.hub_writer import (
    heads_equal_on_all_ranks,
    module_state,
    plan_hub_write,
    staging_directory,
    write_hub_files,
    write_published,
)
from lightning_automodel.core.sharded_load import CheckpointReader, load_checkpoint_into, plan_checkpoint_load
from lightning_automodel.export import build_meta_model_for, parse_size
from lightning_automodel.core.model_build import apply_fsdp2, build_meta_model, materialize


def measure(fn) -> dict:
    os.sync()  # the previous measurement's dirty pages are on disk first: its writeback would slow this one
    dist.barrier()
    base = rss_kib()
    reset_peak_rss()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return {"seconds": time.perf_counter() - start, "peak_kib": rss_kib("VmHWM") - base}


def clear_outputs(out: Path, rank: int) -> None:
    """Delete every earlier output (rank 0), so each measured save starts with the same free memory and page cache."""
    import shutil

    dist.barrier()
    if rank == 0:
        for entry in out.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
    dist.barrier()


def main(hf_dir: str, tmp: str, shard: str, order: str = "dcp-first") -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    config = AutoConfig.from_pretrained(hf_dir)
    model = build_meta_model(config, "causal_lm")
    reader = CheckpointReader(hf_dir)
    plan = plan_checkpoint_load(model, reader)
    apply_fsdp2(model, mesh, mixed_precision=False, activation_checkpointing=False, cpu_offload=False)
    materialize(model, torch.device("cpu"))
    load_checkpoint_into(model, reader, plan)
    reader.close()
    out = Path(tmp)
    layout_model = build_meta_model_for(hub_model_info("", model), Path(hf_dir))

    rounds = iter(range(1_000_000))

    def plain() -> None:
        dcp.save({"state_dict": model.state_dict()}, checkpoint_id=str(out / f"dcp-{next(rounds)}"))

    def hub() -> None:
        state = module_state(model)
        specs = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
        layout = plan_hub_write(layout_model, layout_model.config, specs, dtype=None,
                                heads_equal=lambda head, embed: heads_equal_on_all_ranks(state, head, embed))
        staging = [str(staging_directory(out / "hf")) if rank == 0 else None]
        dist.broadcast_object_list(staging, src=0)

        def write(directory: Path) -> None:
            write_hub_files(directory, layout_model, layout, layout_model.config, state=state, rank=rank, world_size=world,
                            max_shard_bytes=parse_size(shard), dtype=None)

        # as the callback does: marker (the next round may replace it), then rank 0 publishes
        write_published(out / f"hf-{next(rounds)}", write, marker="benchmark", replace=False, staging=Path(staging[0]), owner=rank == 0)

    plain()  # warm-up of both paths on this exact model (first-call set-up is not measured)
    hub()
    records = {}
    for label, fn in (("HuggingFaceCheckpoint", hub), ("plain DCP save", plain)) if order == "hub-first" else (("plain DCP save", plain), ("HuggingFaceCheckpoint", hub)):
        clear_outputs(out, rank)
        records[label] = measure(fn)
    records = {label: records[label] for label in ("plain DCP save", "HuggingFaceCheckpoint")}
    gathered = [None] * world
    dist.all_gather_object(gathered, records)
    if rank == 0:
        merged = {label: [r[label] for r in gathered] for label in records}
        (out / "records.json").write_text(json.dumps(merged))
    dist.barrier()
    dist.destroy_process_group()
    # As benchmarks/load_worker.py: skip interpreter finalization, where a gloo rank now and then aborts
    # ("terminate called without an active exception") after the results are written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:5])
