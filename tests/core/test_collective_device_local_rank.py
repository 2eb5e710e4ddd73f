"""Under NCCL the collective device is this process's GPU even when the user never set one (issue 18 item 7).

On the code before, ``collective_device()`` returned ``torch.cuda.current_device()``: GPU 0 on every
rank of a core-API user who did not call ``torch.cuda.set_device``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from core.pg import single_rank_group
from lightning_automodel.core import distributed as core_distributed


def _as_nccl(monkeypatch, current: int = 0, count: int = 8) -> None:
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_local_rank_decides_when_no_device_was_set(monkeypatch):
    with single_rank_group():
        _as_nccl(monkeypatch)
        monkeypatch.setenv("LOCAL_RANK", "5")
        assert core_distributed.collective_device() == torch.device("cuda", 5)


def test_the_group_bound_device_wins(monkeypatch):
    with single_rank_group():
        _as_nccl(monkeypatch)
        monkeypatch.setenv("LOCAL_RANK", "5")
        group = dist.distributed_c10d._get_default_group()
        monkeypatch.setattr(group, "bound_device_id", torch.device("cuda", 2), raising=False)
        assert core_distributed.collective_device() == torch.device("cuda", 2)


def test_without_local_rank_the_current_device(monkeypatch):
    with single_rank_group():
        _as_nccl(monkeypatch, current=3)
        monkeypatch.delenv("LOCAL_RANK", raising=False)
        assert core_distributed.collective_device() == torch.device("cuda", 3)
