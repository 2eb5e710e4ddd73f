"""A ModelParallelStrategy (FSDP2) whose sharded checkpoints survive a kill at any moment (Lightning writes into
the final directory: a kill leaves new shards beside old metadata), and which keeps CPU-offloaded shards on the host.
Every rank writes into a fsynced staging sibling, which rank 0 publishes with ``replace_directory``."""

from __future__ import annotations

import inspect
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_automodel._compat.lightning import set_process_group_backend
from lightning_automodel.checkpoint_io import CheckpointResumeError
from lightning_automodel.core.atomic_files import fsync_tree, recover_replaced_directory, replace_directory, sibling
from lightning_automodel.core.model_build import CPU_OFFLOAD_ATTR
from lightning_automodel.core.training_checkpoint_reader import CheckpointReadError, SafeFileSystemReader, read_checkpoint_metadata

log = logging.getLogger(__name__)

_META_PT = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint

MissingOptimizerStatePolicy = Literal["warn", "error"]
DCP_METADATA_FILE = ".metadata"  # what makes a directory a DCP checkpoint


def preview(names: Iterable[str]) -> str:
    """At most ten names, sorted, and how many more."""
    names = sorted(names)
    more = f" (+{len(names) - 10} more)" if len(names) > 10 else ""
    return ", ".join(names[:10]) + more


def dcp_stored_keys(path: Path) -> set[str]:
    """The keys a DCP checkpoint directory holds (its metadata only, through the allow-list reader)."""
    return set(SafeFileSystemReader(path).read_metadata().state_dict_metadata)


def state_fqns(keys: Iterable[str], optimizer_key: str | None = None) -> set[str]:
    """Module FQNs that DCP ``keys`` hold optimizer state for (only ``optimizer_key``'s when given)."""
    fqns = set()
    for key in keys:
        optimizer, _, rest = key.partition(".state.")
        if rest and (optimizer == optimizer_key if optimizer_key else optimizer.startswith("optimizer_")):
            fqns.add(rest.rsplit(".", 1)[0])
    return fqns


def names_with_optimizer_state(checkpoint_path: Any, module_prefix: str) -> set[str] | None:
    """Names (relative to ``module_prefix``) a DCP checkpoint has optimizer state for; None when it cannot be told."""
    path = Path(checkpoint_path)
    if not (path / DCP_METADATA_FILE).is_file():
        return None
    try:
        keys = dcp_stored_keys(path)
    except Exception as exc:  # noqa: BLE001 - the strategy's own load reports it
        log.debug("Could not read the DCP metadata of %s: %s", path, exc)
        return None
    return {fqn.removeprefix(module_prefix) for fqn in state_fqns(keys) if fqn.startswith(module_prefix)}


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


def missing_state(current: dict[str, Any], key: str, stored: set[str]) -> list[str]:
    """FQNs in ``current`` (a ``get_optimizer_state_dict``) with any state key the checkpoint lacks."""
    return sorted(fqn for fqn, values in current["state"].items() if any(f"{key}.state.{fqn}.{name}" not in stored for name in values))


def load_present_optimizer_state(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, current: dict[str, Any], key: str, path: Path, stored: set[str]
) -> None:
    """Load ``optimizer``'s DCP state ``key`` for the parameters the checkpoint has (a DCP load of an absent key
    fails); a parameter missing any key ends with no state (a fresh optimizer's, not the zero step's ``step = 1``)."""
    from torch.distributed.checkpoint import load
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


def training_state_fingerprint(module: torch.nn.Module, checkpoint: dict[str, Any]) -> tuple[Any, ...]:
    """Epoch, step, and an exact float64 sum of every local parameter and buffer shard: equal means the same state."""
    from torch.distributed.tensor import DTensor

    # One stack (and sync) per device: with CPU offload, shards (CPU) and buffers (GPU) cannot be stacked together.
    sums = [
        (tensor.to_local() if isinstance(tensor, DTensor) else tensor).detach().sum(dtype=torch.float64)
        for tensor in module.state_dict(keep_vars=True).values()
        if isinstance(tensor, torch.Tensor)
    ]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for value in sums:
        by_device.setdefault(value.device, []).append(value)
    read = {device: iter(torch.stack(group).cpu().tolist()) for device, group in by_device.items()}
    return (checkpoint.get("epoch"), checkpoint.get("global_step"), tuple(next(read[value.device]) for value in sums))


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with crash-safe sharded checkpoint saves (same arguments, plus two). With FSDP2 CPU
    offload only buffers go to the device; on CUDA the process group is ``cpu:gloo,cuda:nccl``.

    Args:
        link_same_step_saves: a save of exactly the previous save's state (``save_last`` right after the top-k
            file) hard-links that save's data files and writes only ``meta.pt``.
        on_missing_optimizer_state: a resume from a sharded checkpoint without optimizer state for some trained
            parameters: ``"warn"`` starts them fresh with one warning, ``"error"`` stops with one line naming them.
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
        # With FSDP2 CPU offload, clipping all-reduces CPU DTensors: an NCCL-only group fails (pytorch#148532).
        if self.process_group_backend is None and self.root_device.type == "cuda":
            set_process_group_backend(self, "cpu:gloo,cuda:nccl")
        super().setup_environment()

    @override
    def model_to_device(self) -> None:
        if self.model is None or not any(getattr(m, CPU_OFFLOAD_ATTR, False) for m in self.model.modules()):
            return super().model_to_device()
        for module in self.model.modules():
            for name, buffer in module.named_buffers(recurse=False, remove_duplicate=False):
                setattr(module, name, buffer.to(self.root_device))  # stays a buffer, persistent or not

    def _on_rank_0_then_agree(self, step: Callable[[], object], what: str) -> None:
        """A filesystem ``step`` on rank 0, then agreement: its failure (a full disk) raises on every rank."""
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
        previous, previous_id = self._previous_save if self.link_same_step_saves and self._previous_save else (None, None)
        source = previous if previous_id == state_id and (previous / DCP_METADATA_FILE).is_file() else None

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
                    if file.is_file() and file.name != _META_PT:
                        os.link(file, staging / file.name)
                metadata = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
                torch.save(metadata, staging / _META_PT)

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
        # DCP unpickles .metadata with plain pickle on every rank: each reads it first through the restricted reader.
        if path.exists():
            try:
                read_checkpoint_metadata(path)
            except CheckpointReadError as exc:
                raise CheckpointResumeError(f"cannot resume from {path}: {exc}") from None
        weights_only = True if weights_only is None else weights_only
        if not self.optimizers or not (path / DCP_METADATA_FILE).is_file():
            return super().load_checkpoint(checkpoint_path, weights_only)
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        stored = dcp_stored_keys(path)
        # Lightning loads module and metadata with the optimizers hidden (it would request every parameter's state)
        optimizers = self.optimizers
        self.optimizers = []  # the public setter; restoring it below wraps the same optimizers again
        try:
            checkpoint = super().load_checkpoint(path, weights_only)
        finally:
            self.optimizers = optimizers
        currents = [get_optimizer_state_dict(self.model, optimizer) for optimizer in optimizers]
        missing = sorted({fqn for i, current in enumerate(currents) for fqn in missing_state(current, f"optimizer_{i}", stored)})
        unused = sorted({fqn for i, current in enumerate(currents) for fqn in state_fqns(stored, f"optimizer_{i}") - set(current["state"])})
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
