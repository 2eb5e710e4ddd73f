"""Re-applying a checkpoint's frozen set on resume, so a resumed run trains the same parameters."""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_automodel.core.naming import canonical_name

_SHOWN = 10


def _preview(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def reapply_frozen_set(
    trainer: pl.Trainer, model: nn.Module, frozen: set[str], *, owner: str, scope: set[str] | None = None
) -> None:
    """Make exactly ``frozen`` (within ``scope``, default all parameters) frozen; warn on any difference.

    A parameter the checkpoint trained that is not in the optimizer cannot be revived after the
    optimizer exists (sharded strategies restore after ``configure_optimizers``): that is an error,
    not a silent change of what trains.
    """
    params: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        params.setdefault(canonical_name(name), p)
    names = set(params) if scope is None else scope & set(params)
    current = {n for n in names if not params[n].requires_grad}
    missing = frozen - set(params)
    to_freeze = (frozen & names) - current
    to_unfreeze = current - frozen
    if missing:
        rank_zero_warn(f"{owner}: the checkpoint froze parameters this model does not have: {_preview(missing)}.")
    if not to_freeze and not to_unfreeze:
        return
    rank_zero_warn(
        f"{owner}: the model now differs from the checkpoint; re-applying the checkpoint's frozen set. "
        f"Freezing again: [{_preview(to_freeze)}]; unfreezing: [{_preview(to_unfreeze)}]."
    )
    in_optimizer = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    if trainer.optimizers:
        unreachable = [n for n in to_unfreeze if id(params[n]) not in in_optimizer]
        if unreachable:
            raise MisconfigurationException(
                f"{owner}: the checkpoint trained {_preview(unreachable)}, but the optimizer was built without them, "
                "so this resume would silently train a different set. Use the freeze configuration the checkpoint "
                "was trained with."
            )
    for n in to_freeze:
        params[n].requires_grad_(False)
    for n in to_unfreeze:
        params[n].requires_grad_(True)
