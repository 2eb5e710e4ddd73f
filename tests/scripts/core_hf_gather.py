"""2 ranks: the hub-layout save gathers each tensor to its writer only, in the output dtype, writes in parallel,
and turns one rank's failed write into an error on both. Usage: core_hf_gather.py TMP

Before, every rank all-gathered every tensor in fp32 (``full_tensor``), the writes ran one after
another, and a failed write left the other rank waiting in the next gather.
"""

import sys
import threading
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig

import lightning_automodel.core.hub_writer as hub
from lightning_automodel.core.init import init_weights_by_module
from lightning_automodel.core.model_build import apply_fsdp2, build_meta_model, materialize
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
    specs = {name: (tuple(t.shape), t.dtype) for name, t in state.items()}
    layout = hub.plan_hub_write(layout_model, layout_model.config, specs, dtype=dtype, heads_equal=partial(hub.heads_equal_on_all_ranks, state))
    out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    return hub.write_hub_files(out, layout_model, layout, layout_model.config, state=state, rank=dist.get_rank(), world_size=2,
                               max_shard_bytes=shard_bytes, dtype=dtype)


def build(config):
    model = build_meta_model(config)
    apply_fsdp2(model, init_device_mesh("cpu", (2,)))
    materialize(model, torch.device("cpu"))
    init_weights_by_module(model, seed=2)
    return model, build_meta_model(config)


def check_written(out: Path, model, layout_model, dtype) -> None:
    """The files hold transformers' reversion of the whole state, cast to ``dtype``."""
    from transformers.core_model_loading import revert_weight_conversion

    full = {name: t.full_tensor() for name, t in hub.module_state(model).items()}
    want = {k: (v[0] if isinstance(v, list) else v) for k, v in revert_weight_conversion(layout_model, full).items()}
    got = {}
    for file in sorted(out.glob("*.safetensors")):
        got.update(load_file(file))
    assert sorted(got) == sorted(want), (sorted(got)[:5], sorted(want)[:5])
    for k, v in want.items():
        assert got[k].dtype == (dtype or v.dtype) and torch.equal(got[k], v.to(dtype or v.dtype)), k


def check_parallel_and_failure(tmp: Path, model, layout_model, write_function: str, tag: str) -> None:
    """Several files: both ranks write at once (each write 0.5 s here); then a write failing on rank 1 only."""
    rank = dist.get_rank()
    intervals = []
    original = getattr(hub, write_function)

    def slow(*args, **kwargs):
        start = time.monotonic()
        time.sleep(0.5)
        original(*args, **kwargs)
        intervals.append((start, time.monotonic()))

    setattr(hub, write_function, slow)
    try:
        save(model, layout_model, tmp / f"many-{tag}", shard_bytes=60_000)
    finally:
        setattr(hub, write_function, original)
    check_written(tmp / f"many-{tag}", model, layout_model, None)
    everyone = [None, None]
    dist.all_gather_object(everyone, intervals)
    assert everyone[0] and everyone[1], everyone
    assert any(a0 < b1 and a1 < b0 for a0, b0 in everyone[0] for a1, b1 in everyone[1]), everyone

    def refuses(*args, **kwargs):
        raise OSError("disk full (test)")

    if rank == 1:
        setattr(hub, write_function, refuses)
    start = time.monotonic()
    try:
        save(model, layout_model, tmp / f"fails-{tag}", shard_bytes=60_000)
    except (OSError, RuntimeError) as exc:
        message = str(exc)
    else:
        raise AssertionError(f"rank {rank}: the save with a failing write on rank 1 succeeded ({tag})")
    finally:
        setattr(hub, write_function, original)
    assert ("disk full" in message) if rank == 1 else ("rank(s) [1]" in message), message
    assert time.monotonic() - start < 20


def main(tmp: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 tie_word_embeddings=False)
    llama, llama_layout = build(AutoConfig.for_model("llama", vocab_size=600, **shape))
    padded_local = max(-(-t.shape[0] // 2) * max(1, t[0].numel()) for t in hub.module_state(llama).values())

    # One file, owned by rank 0, in bf16: no rank ever holds a whole tensor it does not write, nor a whole fp32 one.
    with Largest() as largest:
        files = save(llama, llama_layout, tmp / "one", shard_bytes=2**40, dtype=torch.bfloat16)
    assert files == (["model.safetensors"] if rank == 0 else []), files
    biggest = max(largest.elements.values())
    fp32 = largest.elements.get(torch.float32, 0)
    print(f"LARGEST rank {rank} any {biggest} fp32 {fp32} padded_local {padded_local}", file=sys.stderr)
    if rank == 1:
        assert biggest <= padded_local, (biggest, padded_local)
    assert fp32 <= padded_local, (fp32, padded_local)
    dist.barrier()
    check_written(tmp / "one", llama, llama_layout, torch.bfloat16)
    # Renamed tensors: each rank writes its own rows into the files in place.
    check_parallel_and_failure(tmp, llama, llama_layout, "_write_rows_in_place", "llama")

    # Fused MoE experts (reverted to one tensor per expert): gathered to the file's owner, then written.
    moe, moe_layout = build(AutoConfig.for_model("qwen3_moe", vocab_size=300, num_experts=4, num_experts_per_tok=2,
                                                 moe_intermediate_size=16, head_dim=16, **shape))
    save(moe, moe_layout, tmp / "moe-bf16", shard_bytes=2**40, dtype=torch.bfloat16)
    dist.barrier()
    check_written(tmp / "moe-bf16", moe, moe_layout, torch.bfloat16)
    check_parallel_and_failure(tmp, moe, moe_layout, "save_shard", "moe")
    print(f"OK hf gather rank {rank}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    end_rank_cleanly()
