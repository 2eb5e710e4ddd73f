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
        h.update(name.encode("utf-8", "surrogatepass"))  # any str, even lone surrogates
        h.update(b"\0")
    return h.hexdigest()


def first_mismatch_across_ranks(names: Sequence[str]) -> tuple[int, str] | None:
    """Compare a set of names across ranks: ``(rank, first differing name)`` or None when all agree.

    Every rank must call this (it is a collective). Only a digest travels unless the digests differ,
    so the common case costs one tiny all-gather. Without a process group it returns None. Under NCCL,
    ``all_gather_object`` uses the current CUDA device, which Lightning sets for each rank.
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


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """The device whose tensors the collectives of ``group`` (default: the world) accept.

    NCCL has no CPU path: a CPU tensor handed to it fails, on GPU machines only (gloo hides it). So
    every collective in the package moves its (tiny) tensor here first. Callbacks that have a
    strategy pass ``trainer.strategy.root_device`` instead, which is the same device.
    """
    if not is_distributed():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", _local_cuda_index())
    if "xccl" in backend:
        return torch.device("xpu", torch.xpu.current_device())
    return torch.device("cpu")


def _local_cuda_index() -> int:
    """This process's GPU: the one the process group was bound to, else ``LOCAL_RANK``'s, else the current one.

    A core-API user under torchrun who never called ``torch.cuda.set_device`` has every rank on
    GPU 0 as the "current" device; NCCL then hangs or fails. Lightning sets the device, so for its
    jobs all three agree.
    """
    bound = getattr(dist.group.WORLD, "bound_device_id", None)  # the default group (public ``group.WORLD``)
    if bound is not None and bound.index is not None:
        return bound.index
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and local_rank.isdigit() and torch.cuda.device_count() > 0:
        return int(local_rank) % torch.cuda.device_count()
    return torch.cuda.current_device()


def all_reduce_sum_(tensor: torch.Tensor, *, device: torch.device | None = None) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place, on ``device`` (default: :func:`collective_device`).

    A no-op without a process group. The tensor is copied to the collective's device and back only
    when it lives elsewhere (a CPU scalar under NCCL, CPU-offloaded shards' statistics).
    """
    if not is_distributed():
        return tensor
    target = device if device is not None else collective_device()
    buffer = tensor if tensor.device == target else tensor.to(target)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    if buffer is not tensor:
        tensor.copy_(buffer)
    return tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (its local shard); any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def module_seed(seed: int, name: str) -> int:
    """A seed for one named module or parameter from the run's seed: the same on every rank and at every world size."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
