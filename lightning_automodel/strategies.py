"""A ModelParallelStrategy (FSDP2) whose sharded checkpoints never exist half-written, and which keeps
CPU-offloaded shards in host memory.

Lightning writes a sharded (DCP) checkpoint into its final directory, overwriting the previous one
file by file; a run killed in the middle leaves ``last.ckpt`` with new shards next to old metadata,
and a resume loads garbage or fails. Here every rank writes into a temporary sibling directory, and
rank 0 swaps it into place only after every rank has finished. A kill at any moment leaves either
the previous complete checkpoint or the new one under the final name.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from typing_extensions import override

from lightning_automodel.models.building import CPU_OFFLOAD_ATTR

log = logging.getLogger(__name__)


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}")


def offloads_to_cpu(module: torch.nn.Module) -> bool:
    """Whether ``models.building.apply_fsdp2(..., cpu_offload=True)`` sharded some part of ``module``."""
    return any(getattr(m, CPU_OFFLOAD_ATTR, False) for m in module.modules())


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with atomic sharded checkpoint saves (same arguments).

    With FSDP2 CPU offload, only buffers go to the device: Lightning's ``model.to(device)`` would copy
    every shard to the GPU (the state that did not fit, hence the offload) and FSDP2 would then refuse
    it ("FSDP parameters should be materialized on CPU when enabling CPU offloading").
    """

    @override
    def model_to_device(self) -> None:
        if self.model is None or not offloads_to_cpu(self.model):
            return super().model_to_device()
        for module in self.model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(self.root_device)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        final = Path(self.broadcast(str(filepath)))
        staging, previous = _sibling(final, "tmp"), _sibling(final, "old")
        if self.global_rank == 0 and staging.exists():
            shutil.rmtree(staging)  # left over by a run killed while saving
        self.barrier("atomic_checkpoint_prepare")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("atomic_checkpoint_written")
        if self.global_rank == 0:
            if final.exists():
                if previous.exists():
                    shutil.rmtree(previous)
                os.replace(final, previous)
            os.replace(staging, final)
            shutil.rmtree(previous, ignore_errors=True)
        self.barrier("atomic_checkpoint_done")

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        super().remove_checkpoint(filepath)
        if self.global_rank == 0:
            for tag in ("tmp", "old"):
                shutil.rmtree(_sibling(Path(filepath), tag), ignore_errors=True)
