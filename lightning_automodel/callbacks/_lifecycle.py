"""When model surgery runs, whatever the user's LightningModule looks like.

Lightning has no callback hook between ``configure_model`` and ``configure_optimizers``, and
``Callback.setup`` runs before ``configure_model`` (and before the LightningModule's own ``setup``).
So two LightningModule methods are wrapped on the instance, once:

* ``setup``: if the model already has parameters, surgery runs here (before FSDP2 ``fully_shard`` in
  ``configure_model``, which is what the bf16 cast needs).
* ``configure_model`` (only when overridden): surgery runs again right after it returns, on the
  built or sharded model (what the tie repair needs). Surgeries are idempotent.

Both moments precede ``configure_optimizers``, so frozen parameters never reach the optimizer.

The wrappers hold no state and no Trainer: each call looks up the Trainer the module is attached to
*now* and runs the surgery callbacks of *that* Trainer (``trainer.callbacks``), sorted by
``surgery_order`` (freeze 10, dead parameters 20, cast 30, tie 40, summary 50) whatever the order of
``Trainer(callbacks=...)``. Lightning skips ``teardown`` after an exception, so nothing may depend on
it: a fit that failed leaves nothing behind, and a second Trainer on the same module sees only its
own callbacks. Per-run state lives on the callbacks and is reset in their ``setup``.

A surgery callback may also define ``apply_before_sharding(trainer, pl_module, model)`` for changes
that must happen on the unsharded (meta) model, before ``fully_shard``: a LightningModule that shards
in ``configure_model`` runs those (``prepare_before_sharding`` in ``callbacks/_pre_shard.py``), taking
the Trainer from :func:`attached_trainer` and the callbacks from :func:`surgery_callbacks`, in the
same order.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_automodel.callbacks._export_info import record_export_info
from lightning_automodel.core.discovery import find_hf_model
from lightning_automodel.core.distributed import first_mismatch_across_ranks
from lightning_automodel.core.naming import unique_named_parameters

log = logging.getLogger(__name__)

_WRAPPED_ATTR = "__automodel_wrapped__"


def target_model(pl_module: nn.Module) -> tuple[str, nn.Module]:
    """``(prefix, model)``: the Hugging Face model inside the LightningModule, or the module itself."""
    return find_hf_model(pl_module)


def frozen_names(model: nn.Module) -> list[str]:
    """Canonical names of the model's frozen parameters (each tensor once)."""
    return sorted(name for name, p in unique_named_parameters(model) if not p.requires_grad)


def surgery_callbacks(trainer: pl.Trainer) -> list[ModelSurgeryCallback]:
    """The running Trainer's surgery callbacks in ``surgery_order`` (stable for equal orders)."""
    return sorted((cb for cb in trainer.callbacks if isinstance(cb, ModelSurgeryCallback)), key=lambda cb: cb.surgery_order)


def frozen_by(trainer: pl.Trainer) -> dict[str, str]:
    """Canonical parameter name -> the rule that froze it, over the Trainer's surgery callbacks."""
    rules: dict[str, str] = {}
    for callback in surgery_callbacks(trainer):
        rules.update(callback.frozen_parameters())
    return rules


def attached_trainer(pl_module: pl.LightningModule) -> pl.Trainer | None:
    """The Trainer the module is attached to right now, or None (called outside a Trainer run)."""
    try:
        return pl_module.trainer
    except RuntimeError:  # "... is not attached to a `Trainer`"
        return None


def prepare_before_sharding(pl_module: pl.LightningModule, model: nn.Module | None = None) -> None:
    """Run the surgery that must happen before FSDP2 shards the model (LoRA injection), in ``surgery_order``.

    ``HFCausalLM.configure_model`` calls it right after building the model on meta. A LightningModule
    that builds and shards its own model in ``configure_model`` calls it once, between the build and
    ``fully_shard``: ``prepare_before_sharding(self, self.model)``. Without a Trainer it does nothing.
    """
    trainer = attached_trainer(pl_module)
    if trainer is None:
        return
    if model is None:
        _, model = target_model(pl_module)
    for callback in surgery_callbacks(trainer):
        before = getattr(callback, "apply_before_sharding", None)
        if callable(before):
            before(trainer, pl_module, model)


def run_surgery(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Run the Trainer's surgery callbacks on the target model, then check ranks agree and something trains."""
    callbacks = surgery_callbacks(trainer)
    if not callbacks:
        return
    _, model = target_model(pl_module)
    if not any(True for _ in model.parameters()):
        return  # built later, in configure_model
    for callback in callbacks:
        callback.apply_surgery(trainer, pl_module, model)
    for callback in callbacks:
        callback.surgery_runs += 1
    _check_ranks_agree(model)
    if trainer.state.fn == "fit" and not any(p.requires_grad for p in pl_module.parameters()):
        raise MisconfigurationException(
            "Every parameter is frozen, so there is nothing to train. Check the freeze configuration "
            "(ParameterFreezing freeze_* flags and freeze_modules selectors) or add unfreeze_modules."
        )


def _check_ranks_agree(model: nn.Module) -> None:
    mismatch = first_mismatch_across_ranks(frozen_names(model))
    if mismatch is not None:
        rank, name = mismatch
        raise MisconfigurationException(
            f"Ranks froze different parameters: rank {rank} differs from rank 0 first at {name!r}. Every rank must "
            "apply the same freeze configuration (a config or seed that depends on the rank causes this)."
        )


def _run_for_attached_trainer(pl_module: pl.LightningModule) -> None:
    trainer = attached_trainer(pl_module)
    if trainer is not None:
        run_surgery(trainer, pl_module)


def install_surgery_hooks(pl_module: pl.LightningModule) -> None:
    """Wrap ``pl_module.setup`` and, when overridden, ``configure_model`` once per instance.

    The wrappers close over the module's original bound methods only: which Trainer and which
    callbacks is decided at each call.
    """
    _wrap_once(pl_module, "setup")
    if is_overridden("configure_model", pl_module):
        _wrap_once(pl_module, "configure_model")


def _wrap_once(pl_module: pl.LightningModule, method: str) -> None:
    current = getattr(pl_module, method)
    if getattr(current, _WRAPPED_ATTR, False):
        return

    @functools.wraps(current)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = current(*args, **kwargs)
        _run_for_attached_trainer(pl_module)
        return result

    setattr(wrapped, _WRAPPED_ATTR, True)
    setattr(pl_module, method, wrapped)


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
    """Base class: subclasses implement :meth:`apply_surgery` and set ``surgery_order``.

    Subclasses keep per-run state on themselves and reset it in :meth:`reset_run_state` (called from
    ``setup``), so a callback reused by a second Trainer, or after a failed fit, starts clean.
    """

    surgery_order: ClassVar[int] = 100
    #: completed surgery passes in the current run (0 during the first: log only then)
    surgery_runs: int = 0

    def apply_surgery(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module) -> None:
        raise NotImplementedError

    def frozen_parameters(self) -> Mapping[str, str]:
        """Canonical names this callback froze in the current run -> the rule (for the summary)."""
        return {}

    def reset_run_state(self) -> None:
        """Forget everything from a previous run (override and call ``super()``)."""
        self.surgery_runs = 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _reject_unsupported_strategy(trainer, type(self).__name__)
        self.reset_run_state()
        install_surgery_hooks(pl_module)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # What `lightning-automodel export` needs: any LightningModule's checkpoint becomes exportable.
        record_export_info(pl_module, checkpoint)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if surgery_callbacks(trainer)[0] is not self:
            return  # one warning per fit, from the first surgery callback
        if optimizer_holds_frozen(trainer):
            rank_zero_warn(FROZEN_IN_OPTIMIZER_WARNING)


#: Measured with torch 2.13 (tests/scripts/cb_frozen_in_optimizer.py): frozen parameters in the optimizer get
#: no gradient and no state, and a resume with the same frozen set works on one device and on FSDP2. A sharded
#: (DCP) resume fails only when some of them are trainable again: the new run's optimizer asks DCP for their
#: state. One device then resumes (the missing state is created at the next step).
FROZEN_IN_OPTIMIZER_WARNING = (
    "The optimizer holds frozen parameters. They get no gradient and no optimizer state: training works, and so "
    "does a resume with the same frozen set. One case fails: a sharded (DCP) resume in which some of them are trainable again (the new optimizer asks "
    "for state the checkpoint does not have: `Missing key in checkpoint state_dict: optimizer_0.state...`). "
    "ParameterFreezing prevents that by re-applying the checkpoint's frozen set; to rule it out altogether, build "
    "the optimizer from trainable parameters only: `[p for p in self.parameters() if p.requires_grad]`."
)
