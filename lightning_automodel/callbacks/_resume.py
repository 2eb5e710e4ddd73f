"""Resuming with the checkpoint's frozen set, before any optimizer state is loaded.

If a resumed run trains a different set than the checkpoint's, the optimizer load fails with a raw torch
error or, worse, silently resumes a different run. So the saved frozen set is compared with the model's
before that load and either re-applied (a warning naming the parameters) or refused (an error).

On one device and DDP, ``Callback.on_load_checkpoint`` runs before ``configure_optimizers``: early
enough. Strategies with ``restore_checkpoint_after_setup`` (FSDP) load the optimizer state inside
``strategy.load_checkpoint``, before any callback hook, so that method is patched for the run
(stateless, removed at teardown and on exception): it reads only the callbacks' saved state, lets the
callbacks reconcile, rebuilds the optimizers when what trains changed, and then lets the strategy load.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_automodel.callbacks._lifecycle import attached_trainer, patch_method
from lightning_automodel.core.naming import canonical_name

log = logging.getLogger(__name__)

_SHOWN = 10


def preview(names: Iterable[str]) -> str:
    """At most ten names, sorted, and how many more."""
    names = sorted(names)
    more = f" (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def saved_state(callback_states: Mapping[str, Any], state_key: str) -> Mapping[str, Any] | None:
    """The state a callback saved under ``state_key``, or under an older ``state_key{...}`` key (earlier
    versions put the configuration into the key; read when unambiguous)."""
    if state_key in callback_states:
        return callback_states[state_key]
    legacy = [k for k in callback_states if isinstance(k, str) and k.startswith(state_key + "{")]
    return callback_states[legacy[0]] if len(legacy) == 1 else None


def read_callback_states(checkpoint_path: Any, weights_only: bool | None) -> Mapping[str, Any] | None:
    """Only the ``callbacks`` entry of a checkpoint, without reading a tensor; None when unreadable.

    Always read as data, whatever ``weights_only`` says: this runs before the strategy's own load, which
    reports an unreadable file in its own words, so nothing is raised here.
    """
    from lightning_automodel.core.training_checkpoint_reader import read_checkpoint_metadata

    del weights_only  # kept for the callers' signature: this read is always weights-only
    path = Path(checkpoint_path)
    if not path.exists():
        return None
    try:
        checkpoint = read_checkpoint_metadata(path)
    except Exception as exc:  # noqa: BLE001 - the strategy's own load reports it
        log.debug("Could not read the callback state of %s early: %s", path, exc)
        return None
    callbacks = checkpoint.get("callbacks") if isinstance(checkpoint, Mapping) else None
    return callbacks if isinstance(callbacks, Mapping) else None


DCP_METADATA_FILE = ".metadata"  # what makes a directory a DCP checkpoint


def dcp_stored_keys(path: Path) -> set[str]:
    """The keys a DCP checkpoint directory holds (its metadata only; no tensor is read)."""
    from lightning_automodel.core.training_checkpoint_reader import SafeFileSystemReader  # never plain pickle for .metadata

    return set(SafeFileSystemReader(path).read_metadata().state_dict_metadata)


def optimizer_state_key(module_prefix: str, name: str, optimizer_index: int = 0, state: str = "step") -> str:
    """The DCP key of a parameter's optimizer state, ``name`` relative to the model at ``module_prefix``:
    ``optimizer_0.state.model.lm_head.weight.step``."""
    return f"optimizer_{optimizer_index}.state.{_dotted(module_prefix)}{name}.{state}"


def _dotted(prefix: str) -> str:
    return f"{prefix.rstrip('.')}." if prefix else ""


def state_fqns(keys: Iterable[str], optimizer_key: str | None = None) -> set[str]:
    """Module FQNs that DCP ``keys`` hold optimizer state for (``optimizer_0.state.<fqn>.<state>``), only
    ``optimizer_key``'s when given."""
    fqns = set()
    for key in keys:
        optimizer, _, rest = key.partition(".state.")
        if rest and (optimizer == optimizer_key if optimizer_key else optimizer.startswith("optimizer_")):
            fqns.add(rest.rsplit(".", 1)[0])
    return fqns


def names_with_optimizer_state(checkpoint_path: Any, module_prefix: str) -> set[str] | None:
    """Parameter names (relative to the model at ``module_prefix``) a sharded checkpoint has optimizer state for;
    None when that cannot be told (not a DCP directory, unreadable metadata)."""
    path = Path(checkpoint_path)
    if not (path / DCP_METADATA_FILE).is_file():
        return None
    try:
        keys = dcp_stored_keys(path)
    except Exception as exc:  # noqa: BLE001 - the strategy's own load reports it
        log.debug("Could not read the DCP metadata of %s: %s", path, exc)
        return None
    head = _dotted(module_prefix)
    return {fqn[len(head) :] for fqn in state_fqns(keys) if fqn.startswith(head)}


def _saved_optimizer_names(checkpoint: Mapping[str, Any], model: nn.Module, saved_frozen: Iterable[str]) -> list[dict[int, str]] | None:
    """Per saved optimizer of a full checkpoint (one device, DDP): parameter position -> name.

    The saved optimizer held the model's parameters minus the saved frozen set, in module order; None
    when it holds another count (another optimizer layout: cannot be told).
    """
    states = checkpoint.get("optimizer_states")
    if not isinstance(states, list) or not states:
        return None
    frozen = set(saved_frozen)
    trained = [name for name in (canonical_name(n) for n, _ in model.named_parameters()) if name not in frozen]
    positions = [[i for group in state.get("param_groups", []) for i in group.get("params", [])] for state in states]
    if sum(len(p) for p in positions) != len(trained):
        return None
    names, offset = [], 0
    for saved in positions:
        names.append({position: trained[offset + k] for k, position in enumerate(saved)})
        offset += len(saved)
    return names


def names_with_saved_optimizer_state(checkpoint: Mapping[str, Any], model: nn.Module, saved_frozen: Iterable[str]) -> set[str] | None:
    """:func:`names_with_optimizer_state` for a full checkpoint, whose optimizer state is keyed by position."""
    names = _saved_optimizer_names(checkpoint, model, saved_frozen)
    if names is None:
        return None
    return {by_position[i] for state, by_position in zip(checkpoint["optimizer_states"], names) for i in state.get("state", {}) if i in by_position}


def drop_from_saved_optimizers(checkpoint: dict[str, Any], model: nn.Module, saved_frozen: Iterable[str], drop: Iterable[str]) -> None:
    """Remove parameters from a full checkpoint's optimizer groups (in place), so a run that freezes them loads the rest.

    Lightning restores the optimizer from this same dict after the callbacks' ``on_load_checkpoint``.
    """
    drop = set(drop)
    names = _saved_optimizer_names(checkpoint, model, saved_frozen)
    if names is None or not drop:
        return
    for state, by_position in zip(checkpoint["optimizer_states"], names):
        for group in state.get("param_groups", []):
            group["params"] = [i for i in group["params"] if by_position.get(i) not in drop]
        for i in [i for i in state.get("state", {}) if by_position.get(i) in drop]:
            del state["state"][i]


@dataclass(frozen=True)
class FrozenSetDiff:
    """How the model's frozen set differs from a checkpoint's (canonical names, sorted)."""

    #: the checkpoint froze them, this run would train them
    to_freeze: list[str]
    #: the checkpoint trained them, this run would freeze them
    to_unfreeze: list[str]
    #: the checkpoint froze them, the model has no such parameter
    missing: list[str]

    def __bool__(self) -> bool:
        return bool(self.to_freeze or self.to_unfreeze)

    def describe(self) -> str:
        parts = []
        if self.to_freeze:
            parts.append(f"the checkpoint froze {len(self.to_freeze)} that this run would train: [{preview(self.to_freeze)}]")
        if self.to_unfreeze:
            parts.append(
                f"the checkpoint trained {len(self.to_unfreeze)} that this run would freeze: [{preview(self.to_unfreeze)}]"
            )
        return "; ".join(parts)


def _params_by_name(model: nn.Module) -> dict[str, nn.Parameter]:
    params: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        params.setdefault(canonical_name(name), p)
    return params


def frozen_set_diff(model: nn.Module, frozen: Iterable[str], *, scope: Iterable[str] | None = None) -> FrozenSetDiff:
    """Compare the model's frozen parameters with ``frozen`` (within ``scope``, default all parameters)."""
    frozen = set(frozen)
    params = _params_by_name(model)
    names = set(params) if scope is None else set(scope) & set(params)
    current = {n for n in names if not params[n].requires_grad}
    return FrozenSetDiff(
        to_freeze=sorted((frozen & names) - current),
        to_unfreeze=sorted(current - frozen),
        missing=sorted(frozen - set(params)),
    )


def apply_frozen_set(model: nn.Module, diff: FrozenSetDiff) -> None:
    """Make the model's frozen set the checkpoint's: freeze ``to_freeze``, unfreeze ``to_unfreeze``."""
    params = _params_by_name(model)
    for name in diff.to_freeze:
        params[name].requires_grad_(False)
    for name in diff.to_unfreeze:
        params[name].requires_grad_(True)


def install_resume_check(strategy: pl.strategies.Strategy) -> None:
    """Patch ``strategy.load_checkpoint`` once so callbacks reconcile before the optimizer state loads.

    At each call the patch finds the Trainer of the strategy's LightningModule and calls
    ``reconcile_with_checkpoint(trainer, pl_module, callback_states, checkpoint_path)`` on each of its
    callbacks that defines it; when one changed what trains, the (still stateless) optimizers are rebuilt.
    """
    patch_method(strategy, "load_checkpoint", _load_after_reconcile)


def _load_after_reconcile(strategy: pl.strategies.Strategy, call_previous: Any, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
    _reconcile_before_load(strategy, checkpoint_path, kwargs.get("weights_only", args[0] if args else None))
    return call_previous(checkpoint_path, *args, **kwargs)


def _reconcile_before_load(strategy: pl.strategies.Strategy, checkpoint_path: Any, weights_only: bool | None) -> None:
    pl_module = strategy.lightning_module
    trainer = attached_trainer(pl_module) if pl_module is not None else None
    if trainer is None or trainer.state.fn != "fit":
        return
    reconcilers = [cb for cb in trainer.callbacks if callable(getattr(cb, "reconcile_with_checkpoint", None))]
    if not reconcilers:
        return
    states = read_callback_states(checkpoint_path, weights_only)
    if states is None:
        return
    changed = False
    for callback in reconcilers:
        changed |= bool(callback.reconcile_with_checkpoint(trainer, pl_module, states, checkpoint_path))
    if changed and strategy.optimizers:
        strategy.setup_optimizers(trainer)
        log.info("Rebuilt the optimizers for the checkpoint's frozen set before loading their state.")
