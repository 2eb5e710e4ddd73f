"""What a checkpoint says about the run that saved it: the callbacks' state, the keys a sharded (DCP)
checkpoint stores, and how its frozen set differs from the model's. Read without loading a tensor."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from lightning_automodel.core.naming import canonical_name
from lightning_automodel.core.training_checkpoint_reader import SafeFileSystemReader, read_checkpoint_metadata

log = logging.getLogger(__name__)

DCP_METADATA_FILE = ".metadata"  # what makes a directory a DCP checkpoint


def preview(names: Iterable[str]) -> str:
    """At most ten names, sorted, and how many more."""
    names = sorted(names)
    more = f" (+{len(names) - 10} more)" if len(names) > 10 else ""
    return ", ".join(names[:10]) + more


def saved_state(callback_states: Mapping[str, Any], state_key: str) -> Mapping[str, Any] | None:
    """The state a callback saved under ``state_key``, or under an older ``state_key{...}`` key (earlier
    versions put the configuration into the key; read when unambiguous)."""
    if state_key in callback_states:
        return callback_states[state_key]
    legacy = [k for k in callback_states if isinstance(k, str) and k.startswith(state_key + "{")]
    return callback_states[legacy[0]] if len(legacy) == 1 else None


def read_callback_states(checkpoint_path: Any) -> Mapping[str, Any] | None:
    """Only the ``callbacks`` entry of a checkpoint, read as data (never plain pickle); None when unreadable.

    This runs before the strategy's own load, which reports an unreadable file in its own words.
    """
    path = Path(checkpoint_path)
    if not path.exists():
        return None
    try:
        callbacks = read_checkpoint_metadata(path).get("callbacks")
    except Exception as exc:  # noqa: BLE001 - the strategy's own load reports it
        log.debug("Could not read the callback state of %s early: %s", path, exc)
        return None
    return callbacks if isinstance(callbacks, Mapping) else None


def dcp_stored_keys(path: Path) -> set[str]:
    """The keys a DCP checkpoint directory holds (its metadata only, through the allow-list reader)."""
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
