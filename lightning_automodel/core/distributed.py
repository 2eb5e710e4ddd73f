"""Rank helpers that work with or without an initialized process group."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist


def _env_int(variable: str, default: str) -> int:
    """An integer environment variable, with an error that names it and the fix when it is not one."""
    raw = os.environ.get(variable, default)
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"Environment variable {variable}={raw!r} is not an integer. Unset it or set it to the process's "
            f"{'global rank' if variable == 'RANK' else 'number of processes'} (as torchrun does)."
        ) from None


def is_distributed() -> bool:
    """Whether a default process group exists (collectives are possible)."""
    return dist.is_available() and dist.is_initialized()


def get_rank_safe() -> int:
    """Global rank: from the process group when there is one, else ``RANK`` (default 0)."""
    if is_distributed():
        return dist.get_rank()
    return _env_int("RANK", "0")


def get_world_size_safe() -> int:
    """World size: from the process group when there is one, else ``WORLD_SIZE`` (default 1)."""
    if is_distributed():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", "1")


def is_rank_0() -> bool:
    """Whether this is global rank 0 (not the local rank)."""
    return get_rank_safe() == 0


def digest_names(names: Iterable[str]) -> str:
    """Order-independent sha256 of a set of names (what a checkpoint records instead of the names' tensors)."""
    h = hashlib.sha256()
    for name in sorted(set(names)):
        h.update(name.encode())
        h.update(b"\0")
    return h.hexdigest()


def first_mismatch_across_ranks(names: Sequence[str]) -> tuple[int, str] | None:
    """Compare a set of names across ranks: ``(rank, first differing name)`` or None when all agree.

    Every rank must call this (it is a collective). Only a digest travels unless the digests differ,
    so the common case costs one tiny all-gather. Without a process group it returns None.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return None
    mine = digest_names(names)
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, mine)
    if len(set(digests)) == 1:
        return None
    everyone: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(set(names)))
    reference = set(everyone[0] or [])
    for rank, theirs in enumerate(everyone[1:], start=1):
        diff = sorted(reference.symmetric_difference(theirs or []))
        if diff:
            return rank, diff[0]
    return None  # pragma: no cover - digests differed, so some set differs


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over all ranks; a no-op without a process group."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
