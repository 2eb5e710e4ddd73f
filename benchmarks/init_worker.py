"""One rank of the random-init case: ``torchrun --nproc_per_node=N benchmarks/init_worker.py OUT.json [smoke]``.

Every rank builds a llama on meta, shards it with FSDP2 over N CPU ranks, materializes it and times
``init_weights_by_module`` (after a barrier). Rank 0 writes every rank's wall and CPU seconds to ``OUT.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import AutoConfig

from lightning_automodel.core.init import init_weights_by_module
from lightning_automodel.core.model_build import apply_fsdp2, build_meta_model, materialize


def config(smoke: bool):
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=1000) if smoke else \
        dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, vocab_size=32000)
    return AutoConfig.for_model("llama", num_attention_heads=8, num_key_value_heads=4, **size)


def main(out: str, smoke: bool) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_meta_model(config(smoke))
    apply_fsdp2(model, init_device_mesh("cpu", (world,)))
    materialize(model, torch.device("cpu"))
    dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    init_weights_by_module(model, seed=0)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    params = sum(p.numel() for p in model.parameters())
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (seconds, cpu_seconds))
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"seconds": [g[0] for g in gathered], "cpu_seconds": [g[1] for g in gathered], "params": params}, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as load_worker.py: skip interpreter finalization (gloo teardown race)


if __name__ == "__main__":
    main(sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "smoke")
