"""A ModelParallelStrategy (FSDP2) whose sharded checkpoints survive a kill at any moment, and which keeps
CPU-offloaded shards in host memory.

Lightning writes a sharded (DCP) checkpoint into its final directory file by file; a kill in the middle
leaves new shards next to old metadata. Here:

* every rank writes into a staging sibling (``.last.ckpt.tmp``), fsynced, and rank 0 publishes it with
  ``core.atomic_files.replace_directory`` (an atomic exchange where the filesystem supports it; elsewhere
  two renames, the previous directory parked at ``.last.ckpt.old``, moved back by the next save or load);
* a resume whose checkpoint lacks optimizer state for some parameters this run trains (no gradient
  before the save, e.g. a vision tower on text, or frozen then) starts those fresh with one warning
  (``on_missing_optimizer_state="warn"``) or stops with one line (``"error"``); Lightning's own load dies
  on ``Missing key in checkpoint state_dict``;
* a second save of the same training state (``save_last`` right after the top-k file) hard-links that
  save's data files and writes only ``meta.pt``; "same" is checked on every rank
  (:func:`training_state_fingerprint`). ``link_same_step_saves=False`` always writes.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
from pathlib import Path
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_automodel._compat.lightning import set_process_group_backend
from lightning_automodel.callbacks._resume import DCP_METADATA_FILE, dcp_stored_keys, preview, state_fqns
from lightning_automodel.core.atomic_files import fsync_tree, recover_replaced_directory, replace_directory, sibling
from lightning_automodel.core.model_build import CPU_OFFLOAD_ATTR

log = logging.getLogger(__name__)

_METADATA_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint

MissingOptimizerStatePolicy = Literal["warn", "error"]


def missing_optimizer_state_message(path: Any, missing: list[str], unused: list[str], *, error: bool) -> str:
    """One line naming the parameters whose optimizer state checkpoint ``path`` lacks (or has unused) and what to do."""
    parts = []
    if missing:
        parts.append(
            f"has no optimizer state for {len(missing)} parameters this run trains: [{preview(missing)}] (they got no "
            "gradient before it was saved, e.g. a vision tower on text-only data, or were frozen then)"
        )
    if unused:
        parts.append(f"has optimizer state for {len(unused)} parameters this run does not train: [{preview(unused)}]")
    head = f"The checkpoint {path} {'; it '.join(parts)}"
    if error:
        return (
            f"{head}. Freeze the dead ones (ParameterFreezing freeze_modules) or resume with the checkpoint's frozen set, "
            "or set AtomicModelParallelStrategy(on_missing_optimizer_state='warn') to start them with fresh optimizer state."
        )
    return f"{head}. Resuming: the former start with fresh optimizer state, the latter's is left out (on_missing_optimizer_state='error' stops instead)."


def unused_state(current: dict[str, Any], key: str, stored: set[str]) -> list[str]:
    """FQNs the checkpoint holds ``key`` optimizer state for that ``current`` does not train."""
    return sorted(state_fqns(stored, key) - set(current["state"]))


def missing_state(current: dict[str, Any], key: str, stored: set[str]) -> list[str]:
    """FQNs in ``current`` (a ``get_optimizer_state_dict``) with any state key the checkpoint lacks."""
    return sorted(fqn for fqn, values in current["state"].items() if any(f"{key}.state.{fqn}.{name}" not in stored for name in values))


def load_present_optimizer_state(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, current: dict[str, Any], key: str, path: Path, stored: set[str]
) -> None:
    """Load ``optimizer``'s DCP state ``key`` for the parameters the checkpoint has; the others start fresh.

    ``current`` (``get_optimizer_state_dict``) has a state for every parameter, and a DCP load of a key
    the checkpoint lacks fails: so only present keys are requested, and a parameter missing any key ends
    with no state at all (a fresh optimizer's, not the zero step's ``step = 1``).
    """
    from torch.distributed.checkpoint import load

    from lightning_automodel.core.training_checkpoint_reader import SafeFileSystemReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    missing = set(missing_state(current, key, stored))
    request = {
        "state": {fqn: values for fqn, values in current["state"].items() if fqn not in missing},
        "param_groups": [
            {k: v for k, v in group.items() if k != "params" and f"{key}.param_groups.{i}.{k}" in stored}
            for i, group in enumerate(current["param_groups"])
        ],
    }
    load({key: request}, storage_reader=SafeFileSystemReader(path))  # .metadata through the allow-list, never plain pickle
    state = {
        "state": {**current["state"], **request["state"]},
        "param_groups": [{**group, **loaded} for group, loaded in zip(current["param_groups"], request["param_groups"])],
    }
    set_optimizer_state_dict(module, optimizer, optim_state_dict=state, options=StateDictOptions(cpu_offload=True))
    # torch lists each group's FQNs in the order of the optimizer's own group.
    by_fqn = {fqn: p for group, named in zip(optimizer.param_groups, current["param_groups"]) for p, fqn in zip(group["params"], named["params"])}
    for fqn in missing:
        optimizer.state.pop(by_fqn[fqn], None)


def offloads_to_cpu(module: torch.nn.Module) -> bool:
    """Whether ``core.model_build.apply_fsdp2(..., cpu_offload=True)`` sharded some part of ``module``."""
    return any(getattr(m, CPU_OFFLOAD_ATTR, False) for m in module.modules())


def training_state_fingerprint(module: torch.nn.Module, checkpoint: dict[str, Any]) -> tuple[Any, ...]:
    """Epoch, step, and an exact float64 sum of every local parameter and buffer shard.

    Equal fingerprints mean the same state: the optimizer state changes only with a step, and an edit
    of the weights at the same step changes a sum. One scalar per tensor, one sync per device.
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

    With FSDP2 CPU offload, gradient clipping all-reduces CPU DTensors and an NCCL-only group fails
    (pytorch#148532); gloo beside NCCL costs no device memory and serves every CPU collective.
    """
    if requested is not None or device.type != "cuda":
        return requested
    return "cpu:gloo,cuda:nccl"


def check_checkpoint_is_data(path: Path) -> None:
    """Refuse (one line) a checkpoint whose metadata would import or run anything when unpickled.

    DCP unpickles ``.metadata`` with plain ``pickle`` on every rank: each rank first reads it (and
    ``meta.pt``) through export's restricted readers, so a crafted file fails here.
    """
    from lightning_automodel.checkpoint_io import CheckpointResumeError
    from lightning_automodel.core.training_checkpoint_reader import CheckpointReadError, read_checkpoint_metadata

    if not path.exists():
        return  # Lightning's load reports a missing path in its own words
    try:
        read_checkpoint_metadata(path)
    except CheckpointReadError as exc:
        raise CheckpointResumeError(f"cannot resume from {path}: {exc}") from None


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with crash-safe sharded checkpoint saves (same arguments, plus two).

    With FSDP2 CPU offload only buffers go to the device (``model.to(device)`` would copy the shards
    that did not fit to the GPU). On CUDA the default process group is ``cpu:gloo,cuda:nccl``
    (:func:`backend_with_cpu_path`), so clipping CPU-offloaded gradients works.

    Args:
        link_same_step_saves: a save of exactly the state of the previous save of this run hard-links
            that save's data files (no second full copy for ``save_last``).
        on_missing_optimizer_state: a resume from a sharded checkpoint without optimizer state for some
            trained parameters: ``"warn"`` starts them fresh with one warning naming them, ``"error"``
            stops with one line naming them.
        *args, **kwargs: ``ModelParallelStrategy``'s.
    """

    def __init__(
        self,
        *args: Any,
        link_same_step_saves: bool = True,
        on_missing_optimizer_state: MissingOptimizerStatePolicy = "warn",
        **kwargs: Any,
    ) -> None:
        if on_missing_optimizer_state not in ("warn", "error"):
            raise MisconfigurationException(
                f"AtomicModelParallelStrategy: on_missing_optimizer_state must be 'warn' or 'error'; got {on_missing_optimizer_state!r}."
            )
        super().__init__(*args, **kwargs)
        # Whether saves are sharded (DCP directories): the constructor argument, read here from the public signature.
        bound = inspect.signature(ModelParallelStrategy.__init__).bind(self, *args, **kwargs)
        bound.apply_defaults()
        self.sharded_saves = bool(bound.arguments["save_distributed_checkpoint"])
        self.link_same_step_saves = link_same_step_saves
        self.on_missing_optimizer_state = on_missing_optimizer_state
        self._previous_save: tuple[Path, tuple[Any, ...]] | None = None

    @override
    def setup_environment(self) -> None:
        # Lightning creates the process group in setup_environment; this is the last point to choose its
        # backend (the root device is known here).
        set_process_group_backend(self, backend_with_cpu_path(self.process_group_backend, self.root_device))
        super().setup_environment()

    @override
    def model_to_device(self) -> None:
        if self.model is None or not offloads_to_cpu(self.model):
            return super().model_to_device()
        for module in self.model.modules():
            for name, buffer in module.named_buffers(recurse=False, remove_duplicate=False):
                setattr(module, name, buffer.to(self.root_device))  # stays a buffer, persistent or not

    def _linkable_previous(self, state_id: tuple[Any, ...]) -> Path | None:
        if not self.link_same_step_saves or self._previous_save is None:
            return None
        path, previous_id = self._previous_save
        return path if previous_id == state_id and (path / DCP_METADATA_FILE).is_file() else None

    def _on_rank_0_then_agree(self, step: Callable[[], object], what: str) -> None:
        """Run a filesystem ``step`` on rank 0, then agree on its outcome (a collective): a failure on rank 0
        alone (a full disk) raises there and, within one all-reduce, as one line on every other rank."""
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
        if not self.sharded_saves:
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
        if self.local_rank == 0:  # one per node (node-local copies too); racing nodes on a shared filesystem are fine
            recover_replaced_directory(path)
        self.barrier("atomic_checkpoint_recover")
        check_checkpoint_is_data(path)
        weights_only = True if weights_only is None else weights_only
        if not self.optimizers or not (path / DCP_METADATA_FILE).is_file():
            return super().load_checkpoint(checkpoint_path, weights_only)
        return self._load_sharded_with_partial_optimizer_state(path, weights_only)

    def _load_sharded_with_partial_optimizer_state(self, path: Path, weights_only: bool | None) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        stored = dcp_stored_keys(path)
        # Lightning's load for the module and the metadata, with the optimizers hidden (it would request
        # every parameter's state); then each optimizer's present state, here.
        optimizers = self.optimizers
        self.optimizers = []  # the public setter; restoring it below wraps the same optimizers again
        try:
            checkpoint = super().load_checkpoint(path, weights_only)
        finally:
            self.optimizers = optimizers
        currents = [get_optimizer_state_dict(self.model, optimizer) for optimizer in optimizers]
        missing = sorted({fqn for i, current in enumerate(currents) for fqn in missing_state(current, f"optimizer_{i}", stored)})
        unused = sorted({fqn for i, current in enumerate(currents) for fqn in unused_state(current, f"optimizer_{i}", stored)})
        if (missing or unused) and self.on_missing_optimizer_state == "error":
            raise MisconfigurationException(missing_optimizer_state_message(path, missing, unused, error=True))
        for i, (optimizer, current) in enumerate(zip(optimizers, currents)):
            load_present_optimizer_state(self.model, optimizer, current, f"optimizer_{i}", path, stored)
        if missing or unused:
            rank_zero_warn(missing_optimizer_state_message(path, missing, unused, error=False))
        return checkpoint

    @override
    def remove_checkpoint(self, filepath: Any) -> None:
        super().remove_checkpoint(filepath)
        if self.global_rank == 0:
            for tag in ("tmp", "old"):
                shutil.rmtree(sibling(Path(filepath), tag), ignore_errors=True)
