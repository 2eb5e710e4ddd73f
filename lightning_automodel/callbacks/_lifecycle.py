"""When model surgery runs, whatever the user's LightningModule looks like.

Lightning has no callback hook between ``configure_model`` and ``configure_optimizers``, and
``Callback.setup`` runs before ``configure_model`` (and before the LightningModule's own ``setup``).
So the coordinator here wraps two LightningModule methods on the instance, once:

* ``setup``: runs after every callback's ``setup``, so all surgery callbacks are registered; if the
  model already has parameters, surgery runs here (before FSDP2 ``fully_shard`` in
  ``configure_model``, which is what the bf16 cast needs).
* ``configure_model`` (only when overridden): surgery runs again right after it returns, on the
  built or sharded model (what the tie repair needs). Surgeries are idempotent.

Both moments precede ``configure_optimizers``, so frozen parameters never reach the optimizer.
Surgeries run in ``surgery_order`` (freeze 10, dead parameters 20, cast 30, tie 40, summary 50),
whatever the order of ``Trainer(callbacks=...)``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_automodel.core.discovery import find_hf_model
from lightning_automodel.core.distributed import first_mismatch_across_ranks
from lightning_automodel.core.naming import unique_named_parameters

log = logging.getLogger(__name__)

_COORDINATOR_ATTR = "_automodel_surgery"
_WRAPPED_ATTR = "__automodel_wrapped__"


def target_model(pl_module: nn.Module) -> tuple[str, nn.Module]:
    """``(prefix, model)``: the Hugging Face model inside the LightningModule, or the module itself."""
    return find_hf_model(pl_module)


def frozen_names(model: nn.Module) -> list[str]:
    """Canonical names of the model's frozen parameters (each tensor once)."""
    return sorted(name for name, p in unique_named_parameters(model) if not p.requires_grad)


class SurgeryCoordinator:
    """Per-LightningModule registry that runs the surgery callbacks in a fixed order."""

    def __init__(self) -> None:
        self.callbacks: dict[str, ModelSurgeryCallback] = {}
        #: canonical parameter name -> rule that froze it, filled by freezing callbacks
        self.frozen_by: dict[str, str] = {}
        self.runs = 0
        self.checked_optimizer_for_fit = False

    def register(self, callback: ModelSurgeryCallback) -> None:
        self.callbacks[callback.state_key] = callback

    def ordered(self) -> list[ModelSurgeryCallback]:
        return sorted(self.callbacks.values(), key=lambda cb: cb.surgery_order)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _, model = target_model(pl_module)
        if not any(True for _ in model.parameters()):
            return
        for callback in self.ordered():
            callback.apply_surgery(trainer, pl_module, model)
        self.runs += 1
        self._check_ranks_agree(model)
        if trainer.state.fn == "fit" and not any(p.requires_grad for p in pl_module.parameters()):
            raise MisconfigurationException(
                "Every parameter is frozen, so there is nothing to train. Check the freeze configuration "
                "(ParameterFreezing freeze_* flags and freeze_modules selectors) or add unfreeze_modules."
            )

    def _check_ranks_agree(self, model: nn.Module) -> None:
        mismatch = first_mismatch_across_ranks(frozen_names(model))
        if mismatch is not None:
            rank, name = mismatch
            raise MisconfigurationException(
                f"Ranks froze different parameters: rank {rank} differs from rank 0 first at {name!r}. Every rank must "
                "apply the same freeze configuration (a config or seed that depends on the rank causes this)."
            )

    def install(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wrap ``pl_module.setup`` and, when overridden, ``configure_model`` once (idempotent)."""
        _wrap_once(pl_module, "setup", lambda: self.run(trainer, pl_module))
        if is_overridden("configure_model", pl_module):
            _wrap_once(pl_module, "configure_model", lambda: self.run(trainer, pl_module))


def _wrap_once(pl_module: pl.LightningModule, method: str, after: Callable[[], None]) -> None:
    """Replace ``pl_module.<method>`` by a wrapper that calls ``after()`` when it returns; once per instance."""
    current = getattr(pl_module, method)
    if getattr(current, _WRAPPED_ATTR, False):
        # Already wrapped (e.g. validate after fit): only refresh what runs afterwards.
        current.__automodel_after__ = after
        return

    @functools.wraps(current)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = current(*args, **kwargs)
        wrapped.__automodel_after__()
        return result

    wrapped.__automodel_after__ = after  # type: ignore[attr-defined]
    setattr(wrapped, _WRAPPED_ATTR, True)
    setattr(pl_module, method, wrapped)


def coordinator_for(pl_module: pl.LightningModule) -> SurgeryCoordinator:
    coordinator = pl_module.__dict__.get(_COORDINATOR_ATTR)
    if coordinator is None:
        coordinator = SurgeryCoordinator()
        pl_module.__dict__[_COORDINATOR_ATTR] = coordinator
    return coordinator


def _reject_unsupported_strategy(trainer: pl.Trainer, name: str) -> None:
    try:
        from lightning.pytorch.strategies import DeepSpeedStrategy
    except ImportError:  # pragma: no cover
        return
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        raise MisconfigurationException(
            f"{name} does not support DeepSpeed: DeepSpeed flattens parameters at wrap time. Use "
            "ModelParallelStrategy (FSDP2), FSDPStrategy, DDP or a single device."
        )


def optimizer_holds_frozen(trainer: pl.Trainer) -> list[int]:
    """Indices of optimizers that hold at least one frozen parameter."""
    bad = []
    for i, optimizer in enumerate(trainer.optimizers):
        if any(not p.requires_grad for group in optimizer.param_groups for p in group["params"]):
            bad.append(i)
    return bad


class ModelSurgeryCallback(Callback):
    """Base class: subclasses implement :meth:`apply_surgery` and set ``surgery_order``."""

    surgery_order: ClassVar[int] = 100

    def apply_surgery(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module) -> None:
        raise NotImplementedError

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _reject_unsupported_strategy(trainer, type(self).__name__)
        coordinator = coordinator_for(pl_module)
        coordinator.register(self)
        coordinator.install(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        coordinator = coordinator_for(pl_module)
        if coordinator.checked_optimizer_for_fit:
            return
        coordinator.checked_optimizer_for_fit = True
        if optimizer_holds_frozen(trainer):
            rank_zero_warn(
                "The optimizer holds frozen parameters. They get no gradient, so AdamW creates no state for them and "
                "a sharded (DCP) resume fails with `Missing key in checkpoint state_dict: optim.state...`. Build the "
                "optimizer from trainable parameters only: `[p for p in self.parameters() if p.requires_grad]`."
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        coordinator = coordinator_for(pl_module)
        coordinator.checked_optimizer_for_fit = False
        # A later Trainer on the same module registers its own callbacks again.
        coordinator.callbacks.pop(self.state_key, None)
