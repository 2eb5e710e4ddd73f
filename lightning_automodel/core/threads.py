"""Torch threads per rank on CPU: several ranks on one host must not each take every core."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def host_cpus() -> int:
    """CPUs this process may run on (the affinity mask where there is one: containers count right)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def set_rank_threads(local_world_size: int) -> int | None:
    """``cpus // local_world_size`` torch threads (and ``OMP_NUM_THREADS``) unless that is set; the count or None.
    Without it 2 ranks on 2 cores oversubscribe and a LoRA step is 8-10x slower."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = max(1, host_cpus() // max(1, local_world_size))
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    log.info("torch threads per rank: %d (%d CPUs, %d ranks on this host; set OMP_NUM_THREADS to override).",
             threads, host_cpus(), local_world_size)
    return threads
