"""2 ranks: counts and the global L2 norm of an FSDP2-sharded model equal the unsharded model's."""

import math
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import tiny_models as tm
from lightning_automodel.core.parameters import count_parameters, parameter_stats
from lightning_automodel.core.tied_head import get_lm_head_weight, has_local_tied_lm_head
from distributed import end_rank_cleanly


def main() -> None:
    dist.init_process_group("gloo")
    reference = tm.tiny_gemma3(seed=1)
    expected_counts = count_parameters(reference)
    expected_norm = math.sqrt(sum(p.detach().double().pow(2).sum().item() for p in reference.parameters()))
    model = tm.tiny_gemma3(seed=1)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard([model.model.embed_tokens, model.lm_head])
    fully_shard(model)
    local_norm_sq = sum(p.to_local().double().pow(2).sum().item() for p in model.parameters())
    stats = parameter_stats(model)
    assert (stats.trainable, stats.total) == tuple(expected_counts), (stats, expected_counts)
    assert abs(stats.l2_norm - expected_norm) < 1e-4 * expected_norm, (stats.l2_norm, expected_norm)
    # The per-shard norm (what the reference logs) is not the model's norm.
    assert abs(math.sqrt(local_norm_sq) - expected_norm) > 1e-3 * expected_norm
    # Placements other than FSDP2's Shard(0): a replicated copy counts once, a Shard(1) split sums.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(3)
    plain = torch.nn.ModuleDict({"rep": torch.nn.Linear(6, 4, bias=False), "col": torch.nn.Linear(8, 4, bias=False)})
    plain_norm = math.sqrt(sum(p.detach().double().pow(2).sum().item() for p in plain.parameters()))
    plain_counts = count_parameters(plain)
    placed = torch.nn.ModuleDict({"rep": torch.nn.Linear(6, 4, bias=False), "col": torch.nn.Linear(8, 4, bias=False)})
    placed.load_state_dict(plain.state_dict())
    placed.rep.weight = torch.nn.Parameter(distribute_tensor(placed.rep.weight.detach(), mesh, [Replicate()]))
    placed.col.weight = torch.nn.Parameter(distribute_tensor(placed.col.weight.detach(), mesh, [Shard(1)]))
    placed_stats = parameter_stats(placed)
    assert (placed_stats.trainable, placed_stats.total) == tuple(plain_counts)
    assert abs(placed_stats.l2_norm - plain_norm) < 1e-6 * plain_norm, (placed_stats.l2_norm, plain_norm)
    assert has_local_tied_lm_head(model)
    full = get_lm_head_weight(model)
    assert torch.equal(full, reference.lm_head.weight.detach())
    dist.barrier()
    dist.destroy_process_group()
    print("OK", dist.is_available(), file=sys.stderr)


if __name__ == "__main__":
    main()
    end_rank_cleanly()  # after every check passed: skip the gloo teardown race at exit
