"""A ModelParallelStrategy (FSDP2) whose sharded checkpoints survive a kill at any moment, and which keeps
CPU-offloaded shards in host memory.

Lightning writes a sharded (DCP) checkpoint into its final directory, overwriting the previous one
file by file; a run killed in the middle leaves ``last.ckpt`` with new shards next to old metadata,
and a resume loads garbage or fails. Here:

* every rank writes into a staging sibling (``.last.ckpt.tmp``); DCP fsyncs each data file as it
  writes it, and rank 0 fsyncs the metadata files and the directory once every rank is done;
* rank 0 then publishes it with ``core.atomic_files.replace_directory``: an atomic exchange with the
  previous directory where the filesystem supports it (ext4, xfs, btrfs, tmpfs), so the final name
  always holds a complete checkpoint; elsewhere two renames, the previous directory parked at
  ``.last.ckpt.old`` in between, which the next save or load (and the CLI's ``--ckpt_path`` check)
  moves back if a kill struck there;
* a second save of the same training state (``ModelCheckpoint(save_last=True)`` saves ``last``
  right after its top-k file, at the same step) hard-links that save's data files instead of
  writing the model and optimizer again; only ``meta.pt`` (which holds ModelCheckpoint's own
  state) is written anew. "Same" is checked, not assumed: the step and an exact sum of every
  local parameter shard must match on every rank (:func:`training_state_fingerprint`). Set
  ``link_same_step_saves=False`` to always write.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override

from lightning_automodel.core.atomic_files import fsync_tree, recover_replaced_directory, replace_directory, sibling
from lightning_automodel.models.building import CPU_OFFLOAD_ATTR

log = logging.getLogger(__name__)

_METADATA_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


def offloads_to_cpu(module: torch.nn.Module) -> bool:
    """Whether ``models.building.apply_fsdp2(..., cpu_offload=True)`` sharded some part of ``module``."""
    return any(getattr(m, CPU_OFFLOAD_ATTR, False) for m in module.modules())


def training_state_fingerprint(module: torch.nn.Module, checkpoint: dict[str, Any]) -> tuple[Any, ...]:
    """Epoch, step, and an exact float64 sum of every local parameter and buffer shard.

    Two saves of one run with equal fingerprints hold the same state: the optimizer state changes
    only with a step (which changes ``global_step``), and any edit of the weights between two saves
    at the same step changes a sum. The live tensors are summed, not the checkpoint's copies; one
    read of the local shards (no allocation beyond one scalar per tensor, one sync per device).
    """
    from torch.distributed.tensor import DTensor

    # One stack (and one sync) per device: with CPU offload the shards are on the CPU and the
    # buffers on the GPU, and one stack across both fails.
    sums: list[torch.Tensor] = []
    for tensor in module.state_dict(keep_vars=True).values():
        if isinstance(tensor, torch.Tensor):
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            sums.append(local.detach().sum(dtype=torch.float64) if local.is_floating_point() else local.detach().double().sum())
    by_device: dict[torch.device, list[int]] = {}
    for position, value in enumerate(sums):
        by_device.setdefault(value.device, []).append(position)
    values: list[float] = [0.0] * len(sums)
    for positions in by_device.values():
        for position, value in zip(positions, torch.stack([sums[p] for p in positions]).cpu().tolist()):
            values[position] = value
    return (checkpoint.get("epoch"), checkpoint.get("global_step"), tuple(values))


def backend_with_cpu_path(requested: str | None, device: torch.device) -> str | None:
    """The process-group backend for ``device``: on CUDA, NCCL plus gloo for CPU tensors unless one was chosen.

    With FSDP2 CPU offload the gradients are CPU DTensors, so Lightning's gradient clipping
    (``clip_grad_norm_``) all-reduces their norm on the CPU, and an NCCL-only group fails ("No
    backend type associated with device type cpu"; pytorch#148532). A gloo backend beside NCCL costs
    no device memory and serves every CPU collective (also DCP's planning of CPU shards).
    """
    if requested is not None or device.type != "cuda":
        return requested
    return "cpu:gloo,cuda:nccl"


def check_checkpoint_is_data(path: Path) -> None:
    """Refuse (one line) a checkpoint whose metadata would import or run anything when unpickled.

    Lightning's load hands a sharded directory to DCP, which unpickles ``.metadata`` with plain
    ``pickle``, and reads ``meta.pt`` with ``torch.load``; every rank reads both. So every rank
    first reads them through the restricted readers export uses (DCP's own types; Lightning's
    metadata types, ``weights_only``): a crafted file fails here, before any plain unpickling.
    """
    from lightning_automodel.checkpoint_io import CheckpointResumeError
    from lightning_automodel.trained_checkpoint import CheckpointReadError, read_checkpoint_metadata

    if not path.exists():
        return  # Lightning's load reports a missing path in its own words
    try:
        read_checkpoint_metadata(path)
    except CheckpointReadError as exc:
        raise CheckpointResumeError(f"cannot resume from {path}: {exc}") from None


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with crash-safe sharded checkpoint saves (same arguments, plus one).

    With FSDP2 CPU offload, only buffers go to the device: Lightning's ``model.to(device)`` would copy
    every shard to the GPU (the state that did not fit, hence the offload) and FSDP2 would then refuse
    it ("FSDP parameters should be materialized on CPU when enabling CPU offloading").

    On CUDA, without an explicit ``process_group_backend``, the process group is ``cpu:gloo,cuda:nccl``
    (:func:`backend_with_cpu_path`), so clipping CPU-offloaded gradients works.

    Args:
        link_same_step_saves: a save of exactly the state of the previous save of this run hard-links
            that save's data files (no second full copy for ``save_last``).
        *args, **kwargs: ``ModelParallelStrategy``'s.
    """

    def __init__(self, *args: Any, link_same_step_saves: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.link_same_step_saves = link_same_step_saves
        self._previous_save: tuple[Path, tuple[Any, ...]] | None = None

    @override
    def setup_environment(self) -> None:
        # Lightning creates the process group from its private ``_process_group_backend`` in
        # setup_environment; this is the last point to choose it (the root device is known here).
        self._process_group_backend = backend_with_cpu_path(self._process_group_backend, self.root_device)
        super().setup_environment()

    @override
    def model_to_device(self) -> None:
        if self.model is None or not offloads_to_cpu(self.model):
            return super().model_to_device()
        for module in self.model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(self.root_device)

    def _linkable_previous(self, state_id: tuple[Any, ...]) -> Path | None:
        if not self.link_same_step_saves or self._previous_save is None:
            return None
        path, previous_id = self._previous_save
        if previous_id != state_id or not (path / ".metadata").is_file():
            return None
        return path

    def _on_rank_0_then_agree(self, step: Callable[[], object], what: str) -> None:
        """Run a filesystem ``step`` on rank 0, then agree on its outcome (a collective).

        A failure on rank 0 alone (a full disk, ``os.link`` refused across filesystems) would leave the
        other ranks at the next barrier until the timeout; here it raises on rank 0 and, within one
        all-reduce, a one-line error on every other rank.
        """
        error: Exception | None = None
        if self.global_rank == 0:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the agreement
                error = exc
        if self.reduce_boolean_decision(error is None, all=True):
            return
        if error is not None:
            raise error
        raise RuntimeError(f"rank 0 failed {what}; its log has the error.")

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        final = Path(self.broadcast(str(filepath)))
        staging = sibling(final, "tmp")
        state_id = training_state_fingerprint(self.lightning_module, checkpoint)
        source = self._linkable_previous(state_id)

        def prepare() -> None:
            recover_replaced_directory(final)
            if staging.exists():
                shutil.rmtree(staging)  # left over by a run killed while saving

        self._on_rank_0_then_agree(prepare, f"preparing {staging}")
        # every rank must take the same branch: link only if every rank's state is unchanged
        source = source if self.reduce_boolean_decision(source is not None, all=True) else None
        if source is None:
            super().save_checkpoint(checkpoint, staging, storage_options)
        else:
            linked = source

            def link() -> None:
                staging.mkdir(parents=True)
                for file in linked.iterdir():
                    if file.is_file() and file.name != _METADATA_FILE:
                        os.link(file, staging / file.name)
                metadata = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
                torch.save(metadata, staging / _METADATA_FILE)

            self._on_rank_0_then_agree(link, f"linking the data files of {source} into {staging}")
        self.barrier("atomic_checkpoint_written")
        self._on_rank_0_then_agree(lambda: (fsync_tree(staging), replace_directory(staging, final)), f"publishing {final}")
        self._previous_save = (final, state_id)
        if source is not None:
            log.info("Checkpoint %s shares the data files of %s (same step).", final, source)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if self.global_rank == 0:
            recover_replaced_directory(path)
        self.barrier("atomic_checkpoint_recover")
        check_checkpoint_is_data(path)
        return super().load_checkpoint(checkpoint_path, True if weights_only is None else weights_only)

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        super().remove_checkpoint(filepath)
        if self.global_rank == 0:
            for tag in ("tmp", "old"):
                shutil.rmtree(sibling(Path(filepath), tag), ignore_errors=True)
