"""Rank helpers that work with or without an initialized process group, and this rank's piece of a DTensor."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

from lightning_automodel._compat.torch import local_shape_and_offset


def _env_int(variable: str, default: str) -> int:
    raw = os.environ.get(variable, default)
    try:
        return int(raw)
    except ValueError:
        raise ValueError(
            f"Environment variable {variable}={raw!r} is not an integer. Unset it or set it to the process's "
            f"{'global rank' if variable == 'RANK' else 'number of processes'} (as torchrun does)."
        ) from None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank_safe() -> int:
    """Global rank: from the process group when there is one, else ``RANK`` (default 0)."""
    return dist.get_rank() if is_distributed() else _env_int("RANK", "0")


def get_world_size_safe() -> int:
    """World size: from the process group when there is one, else ``WORLD_SIZE`` (default 1)."""
    return dist.get_world_size() if is_distributed() else _env_int("WORLD_SIZE", "1")


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
    """A collective: ``(rank, first name differing from rank 0's)`` or None; only digests travel unless they differ."""
    if not is_distributed() or dist.get_world_size() == 1:
        return None
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest_names(names))
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
    """The device whose tensors the collectives of ``group`` accept: NCCL has no CPU path (gloo hides that)."""
    if not is_distributed():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        return torch.device("cuda", _local_cuda_index())
    if "xccl" in backend:
        return torch.device("xpu", torch.xpu.current_device())
    return torch.device("cpu")


def _local_cuda_index() -> int:
    """The bound GPU, else ``LOCAL_RANK``'s, else the current (without ``set_device`` all use GPU 0: NCCL hangs)."""
    bound = getattr(dist.group.WORLD, "bound_device_id", None)
    if bound is not None and bound.index is not None:
        return bound.index
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and local_rank.isdigit() and torch.cuda.device_count() > 0:
        return int(local_rank) % torch.cuda.device_count()
    return torch.cuda.current_device()


def all_reduce_sum_(tensor: torch.Tensor, *, device: torch.device | None = None) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place, on ``device`` (default :func:`collective_device`); no-op alone."""
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


def local_index(tensor: torch.Tensor) -> tuple[slice, ...]:
    """The global index of this rank's piece (no public DTensor query; guarded by ``tests/scripts/load_layouts.py``)."""
    if not hasattr(tensor, "device_mesh"):
        return tuple(slice(0, size) for size in tensor.shape)
    shape, offset = local_shape_and_offset(tensor)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


def copy_local_part(dest: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the full-size ``full`` into ``dest`` (a DTensor's local shard, or all of it)."""
    local = local_tensor(dest)
    if local.numel():
        local.copy_(full[local_index(dest)])


def module_seed(seed: int, name: str) -> int:
    """A seed for one named module or parameter: the same on every rank and at every world size."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
