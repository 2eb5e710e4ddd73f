"""2 ranks: rank helpers read the process group; first_mismatch_across_ranks finds the differing name."""

import os

import torch
import torch.distributed as dist

from lightning_automodel.core.distributed import (
    all_reduce_sum_,
    first_mismatch_across_ranks,
    get_rank_safe,
    get_world_size_safe,
    is_rank_0,
)
from distributed import end_rank_cleanly


def main() -> None:
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        os.environ["RANK"] = "not-a-number"  # the process group wins over the environment once it exists
        assert (get_rank_safe(), get_world_size_safe(), is_rank_0()) == (rank, 2, rank == 0)

        same = ["model.layers.0.mlp.weight", "lm_head.weight"]
        assert first_mismatch_across_ranks(same) is None
        assert first_mismatch_across_ranks(list(reversed(same))) is None  # order does not matter

        # Rank 1 froze one more tensor: every rank learns (1, that name).
        names = same + (["model.norm.weight"] if rank == 1 else [])
        assert first_mismatch_across_ranks(names) == (1, "model.norm.weight")

        # Rank 1 lacks a name that rank 0 has: still reported against rank 1, sorted first difference.
        names = ["a", "c", "b"] if rank == 0 else ["a"]
        assert first_mismatch_across_ranks(names) == (1, "b")

        t = torch.tensor([float(rank + 1)])
        assert all_reduce_sum_(t) is t and t.item() == 3.0
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    end_rank_cleanly()  # after every check passed: skip the gloo teardown race at exit
