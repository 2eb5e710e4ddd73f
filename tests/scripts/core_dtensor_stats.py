"""2 ranks: counts and the global L2 norm of an FSDP2-sharded model equal the unsharded model's."""

import math
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import tiny_models as tm
from lightning_automodel.core.parameters import count_parameters, parameter_stats
from lightning_automodel.core.tied_head import get_lm_head_weight, has_local_tied_lm_head


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
    assert has_local_tied_lm_head(model)
    full = get_lm_head_weight(model)
    assert torch.equal(full, reference.lm_head.weight.detach())
    dist.barrier()
    dist.destroy_process_group()
    print("OK", dist.is_available(), file=sys.stderr)


if __name__ == "__main__":
    main()
