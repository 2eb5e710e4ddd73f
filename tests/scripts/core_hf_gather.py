"""2 ranks: the hub-layout save gathers each tensor to its writer only, in the output dtype, writes in parallel,
and turns one rank's failed write into an error on both. Usage: core_hf_gather.py TMP

Before, every rank all-gathered every tensor in fp32 (``full_tensor``), the writes ran one after
another, and a failed write left the other rank waiting in the next gather.
"""

import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig

import lightning_automodel.core.hub_from_module as hub
from lightning_automodel.core.init import init_weights_by_module
from lightning_automodel.models.building import apply_fsdp2, build_meta_model, materialize
from distributed import end_rank_cleanly


class Largest(TorchDispatchMode):
    """The largest CPU tensor (elements) any op produced, per dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) and not t.is_meta:  # a DTensor's numel is global
                self.elements[t.dtype] = max(self.elements.get(t.dtype, 0), t.numel())
        return out


def save(model, layout_model, out: Path, *, shard_bytes: int, dtype=None) -> list[str]:
    state = hub.module_state(model)
    layout = hub.plan_module_layout(model, layout_model, state, omit=None, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return hub.write_shards_from_all_ranks(layout_model, state, layout, out, rank=dist.get_rank(), world_size=2,
                                           max_shard_bytes=shard_bytes, dtype=dtype)


def main(tmp: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = AutoConfig.for_model("llama", vocab_size=600, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = build_meta_model(config)
    apply_fsdp2(model, init_device_mesh("cpu", (2,)))
    materialize(model, torch.device("cpu"))
    init_weights_by_module(model, seed=2)
    layout_model = build_meta_model(config)
    full = {name: t.full_tensor() for name, t in hub.module_state(model).items()}
    padded_local = max(-(-t.shape[0] // 2) * max(1, t[0].numel()) for t in full.values())

    # One file, written by rank 0, in bf16: rank 1 receives nothing, rank 0 never holds a whole fp32 tensor.
    with Largest() as largest:
        files = save(model, layout_model, tmp / "one", shard_bytes=2**40, dtype=torch.bfloat16)
    assert files == (["model.safetensors"] if rank == 0 else []), files
    biggest = max(largest.elements.values())
    fp32 = largest.elements.get(torch.float32, 0)
    print(f"LARGEST rank {rank} any {biggest} fp32 {fp32} padded_local {padded_local}", file=sys.stderr)
    if rank == 1:
        assert biggest <= padded_local, (biggest, padded_local)
    assert fp32 <= padded_local, (fp32, padded_local)
    dist.barrier()
    written = load_file(tmp / "one" / "model.safetensors")
    assert sorted(written) == sorted(full)
    assert all(written[k].dtype == torch.bfloat16 and torch.equal(written[k], full[k].to(torch.bfloat16)) for k in full)

    # Several files: both ranks write at the same time (each write takes 0.5 s here).
    intervals = []
    original = hub.save_shard

    def slow(path, outputs):
        start = time.monotonic()
        time.sleep(0.5)
        original(path, outputs)
        intervals.append((start, time.monotonic()))

    hub.save_shard = slow
    try:
        save(model, layout_model, tmp / "many", shard_bytes=60_000)
    finally:
        hub.save_shard = original
    everyone = [None, None]
    dist.all_gather_object(everyone, intervals)
    assert len(everyone[0]) >= 2 and len(everyone[1]) >= 2, everyone
    overlap = any(a0 < b1 and a1 < b0 for a0, b0 in everyone[0] for a1, b1 in everyone[1])
    assert overlap, everyone

    # A write failing on rank 1 only: an error on both ranks, quickly.
    def refuses(path, outputs):
        raise OSError(f"disk full (test) writing {path.name}")

    if rank == 1:
        hub.save_shard = refuses
    start = time.monotonic()
    try:
        save(model, layout_model, tmp / "fails", shard_bytes=60_000)
    except (OSError, RuntimeError) as exc:
        message = str(exc)
    else:
        raise AssertionError(f"rank {rank}: the save with a failing write on rank 1 succeeded")
    finally:
        hub.save_shard = original
    assert ("disk full" in message) if rank == 1 else ("rank(s) [1]" in message), message
    assert time.monotonic() - start < 20
    print(f"OK hf gather rank {rank}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_rank_cleanly()
