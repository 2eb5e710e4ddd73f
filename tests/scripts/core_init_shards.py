"""2 ranks: random init draws each rank's rows only, and equals the one-process init, with blocks that cross shard edges.

Prints ``BIGGEST <elements>`` per rank: the largest CPU tensor any op produced during the sharded
init, against the largest local shard. Before, each module got a full-size CPU twin on every rank.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig

import lightning_automodel.core.init as init_module
from lightning_automodel.core.init import init_weights_by_module
from lightning_automodel.core.distributed import local_index
from lightning_automodel.core.model_build import apply_fsdp2, build_meta_model, materialize
from distributed import end_rank_cleanly


class Biggest(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self.elements = max(self.elements, t.numel())
        return out


class Drawn(TorchDispatchMode):
    """Counts the elements random ops fill (``uniform_``/``normal_`` on real tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("uniform_", "normal_") and not args[0].is_meta:
            self.elements += args[0].numel()
        return func(*args, **(kwargs or {}))


def check_default_blocks_split_a_projection(mesh) -> None:
    """With the default block size, a 1024 x 1024 projection on 2 ranks costs each rank about half of its numbers.

    Before, one block held 2**20 elements: the whole projection was one block, drawn whole by both ranks.
    """
    from torch.distributed.fsdp import fully_shard

    model = fully_shard(torch.nn.Sequential(torch.nn.Linear(1024, 1024, bias=False)), mesh=mesh)
    with Drawn() as drawn:
        init_weights_by_module(model, seed=3)
    share = drawn.elements / (1024 * 1024)
    print(f"DRAWN rank {dist.get_rank()} share {share:.3f}", file=sys.stderr)
    assert share <= 0.6, share


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    check_default_blocks_split_a_projection(mesh)
    init_module._BLOCK_ELEMENTS = 7 * 64 + 5  # 7 rows of the embedding per block: blocks straddle the shard edge
    config = AutoConfig.for_model("llama", vocab_size=600, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=3)
    sharded = build_meta_model(config)
    apply_fsdp2(sharded, mesh)
    materialize(sharded, torch.device("cpu"))
    with Biggest() as biggest:
        init_weights_by_module(sharded, seed=11)
    whole = build_meta_model(config)
    materialize(whole, torch.device("cpu"))
    init_weights_by_module(whole, seed=11)
    expected = dict(whole.named_parameters())
    for name, param in sharded.named_parameters():
        want = expected[name.replace("_checkpoint_wrapped_module.", "")]
        assert torch.equal(param.to_local(), want[local_index(param)]), name
    embed = expected["model.embed_tokens.weight"]
    assert torch.count_nonzero(embed[3]) == 0 and torch.count_nonzero(embed[4]) == 64  # the padding row, only it
    assert abs(embed.std().item() - config.initializer_range) < 0.1 * config.initializer_range, embed.std().item()
    largest_local = max(p.to_local().numel() for p in sharded.parameters())
    print(f"BIGGEST rank {dist.get_rank()} {biggest.elements} largest_local {largest_local} full_embedding {embed.numel()}", file=sys.stderr)
    assert biggest.elements <= largest_local, (biggest.elements, largest_local)


if __name__ == "__main__":
    main()
    end_rank_cleanly()
