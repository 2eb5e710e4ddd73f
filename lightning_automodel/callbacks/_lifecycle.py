"""When model surgery runs, whatever the user's LightningModule looks like.

Lightning has no callback hook between ``configure_model`` and ``configure_optimizers``, and
``Callback.setup`` runs before ``configure_model``. So two LightningModule methods are patched on the
instance for one Trainer run: ``setup`` (surgery before FSDP2 ``fully_shard``, which the bf16 cast
needs) and, when overridden, ``configure_model`` (surgery again on the built or sharded model, which the
tie repair needs). Surgeries are idempotent; both moments precede ``configure_optimizers``, so frozen
parameters never reach the optimizer.

The patches (:class:`MethodPatch`) are picklable objects that hold no Trainer: each call runs the
surgery callbacks of the Trainer the module is attached to *now*, in :func:`surgery_schedule` order.
Every surgery callback removes all patches at ``teardown`` and at ``on_exception`` (Lightning skips
``teardown`` after an exception), so after a fit the module pickles, deep-copies and runs under
``ddp_spawn`` untouched. Per-run state lives on the callbacks and is reset in their ``setup``.
A surgery callback may define ``apply_before_sharding(trainer, pl_module, model)`` for changes that
must happen on the unsharded (meta) model: see :func:`prepare_before_sharding`.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_automodel.core.hub_layout import record_export_info
from lightning_automodel.core.discovery import find_hf_model
from lightning_automodel.core.distributed import first_mismatch_across_ranks
from lightning_automodel.core.naming import unique_named_parameters

log = logging.getLogger(__name__)

#: Where the job's ``weights_dtype`` cast runs among the callbacks' ``surgery_order`` values: after LoRA
#: injection (5), so peft creates the adapters on fp32 base weights (fp32 adapters, which the cast keeps),
#: and before the freeze rules (10), which see the final dtypes.
WEIGHTS_DTYPE_ORDER = 7


def target_model(pl_module: nn.Module) -> tuple[str, nn.Module]:
    """``(prefix, model)``: the Hugging Face model inside the LightningModule, or the module itself."""
    return find_hf_model(pl_module)


def frozen_names(model: nn.Module) -> list[str]:
    """Canonical names of the model's frozen parameters (each tensor once)."""
    return sorted(name for name, p in unique_named_parameters(model) if not p.requires_grad)


class SurgeryStep(Protocol):
    """A step of :func:`surgery_schedule`: a surgery callback, or the job's weights dtype cast."""

    surgery_order: int


class WeightsDtypeCast:
    """The job's ``weights_dtype`` as a surgery step: a model setting, not a callback (fit and plan both run it)."""

    surgery_order: int = WEIGHTS_DTYPE_ORDER

    def __init__(self, cast: Callable[[nn.Module], object]) -> None:
        self.cast = cast

    def apply_to_model(self, model: nn.Module) -> None:
        self.cast(model)


def surgery_schedule(
    callbacks: Iterable[Callback], weights_cast: Callable[[nn.Module], object] | None = None
) -> list[SurgeryStep]:
    """THE order of surgery, for ``fit`` and ``plan``: LoRA (5), weights dtype (7), freeze (10), dead
    parameters (20), mixed cast (30), tie (40), summary (50); equal orders keep the order given."""
    steps: list[SurgeryStep] = [cb for cb in callbacks if isinstance(cb, ModelSurgeryCallback)]
    if weights_cast is not None:
        steps.append(WeightsDtypeCast(weights_cast))
    return sorted(steps, key=lambda step: step.surgery_order)


def surgery_callbacks(trainer: pl.Trainer) -> list[ModelSurgeryCallback]:
    """The running Trainer's surgery callbacks in ``surgery_order`` (stable for equal orders)."""
    return [step for step in surgery_schedule(trainer.callbacks) if isinstance(step, ModelSurgeryCallback)]


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


def prepare_before_sharding(
    pl_module: pl.LightningModule, model: nn.Module | None = None, *, weights_cast: Callable[[nn.Module], object] | None = None
) -> None:
    """Run the surgery that must happen before FSDP2 shards the model, in :func:`surgery_schedule` order.

    That is LoRA injection, then ``weights_cast`` (``HFCausalLM``'s ``weights_dtype``) when given.
    ``HFCausalLM.configure_model`` calls it right after building the model on meta. A LightningModule
    that builds and shards its own model in ``configure_model`` calls it once, between the build and
    ``fully_shard``: ``prepare_before_sharding(self, self.model)``. Without a Trainer only the cast runs.
    """
    trainer = attached_trainer(pl_module)
    if model is None:
        _, model = target_model(pl_module)
    callbacks = trainer.callbacks if trainer is not None else []
    for step in surgery_schedule(callbacks, weights_cast):
        if isinstance(step, WeightsDtypeCast):
            step.apply_to_model(model)
            continue
        before = getattr(step, "apply_before_sharding", None)
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
    mismatch = first_mismatch_across_ranks(frozen_names(model))
    if mismatch is not None:
        raise MisconfigurationException(
            f"Ranks froze different parameters: rank {mismatch[0]} differs from rank 0 first at {mismatch[1]!r}. Every "
            "rank must apply the same freeze configuration (a config or seed that depends on the rank causes this)."
        )
    if trainer.state.fn == "fit" and not any(p.requires_grad for p in pl_module.parameters()):
        raise MisconfigurationException(
            "Every parameter is frozen, so there is nothing to train. Check the freeze configuration "
            "(ParameterFreezing freeze_* flags and freeze_modules selectors) or add unfreeze_modules."
        )


class _Absent:
    """``MethodPatch.previous`` when the owner had no instance attribute (its class's method applies)."""

    def __reduce__(self) -> str:
        return "_ABSENT"  # pickling and deepcopy keep the singleton, so identity checks hold in a copy


_ABSENT = _Absent()


class MethodPatch:
    """``owner.<name>`` replaced on the instance by ``around(owner, call_previous, *args, **kwargs)``.

    Not a closure, so a patched owner stays picklable and a deep copy's patch calls the copy.
    ``previous`` is the instance attribute before (``_ABSENT``: the class's method, looked up at each
    call). An inactive patch only calls through (left when something patched on top of it).
    """

    def __init__(self, owner: object, name: str, around: Callable[..., Any], previous: Any = _ABSENT) -> None:
        self.owner = owner
        self.name = name
        self.around = around
        self.previous = previous
        self.active = True

    def call_previous(self, *args: Any, **kwargs: Any) -> Any:
        return self._previous()(*args, **kwargs)

    def _previous(self) -> Callable[..., Any]:
        if self.previous is not _ABSENT:
            return self.previous
        # The class attribute through the descriptor protocol: a function, staticmethod or classmethod binds as usual.
        return getattr(type(self.owner), self.name).__get__(self.owner, type(self.owner))

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        # Lightning's is_overridden unwraps __wrapped__: a patched configure_model still counts as overridden.
        return self._previous()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return self.call_previous(*args, **kwargs)
        return self.around(self.owner, self.call_previous, *args, **kwargs)


#: Patches not removed yet (weak: a patch lives as long as its owner's attribute or a wrapper holds it).
_LIVE_PATCHES: weakref.WeakSet[MethodPatch] = weakref.WeakSet()


def _patch_chain(owner: object, name: str) -> list[MethodPatch]:
    """Our patches of ``owner.<name>``, outermost first (stops at anything that is not a MethodPatch)."""
    chain = []
    current = vars(owner).get(name, _ABSENT) if hasattr(owner, "__dict__") else _ABSENT
    while isinstance(current, MethodPatch):
        chain.append(current)
        current = current.previous
    return chain


def patch_method(owner: object, name: str, around: Callable[..., Any]) -> None:
    """Patch ``owner.<name>`` with ``around`` unless an active patch with the same ``around`` is already there."""
    if any(patch.around is around and patch.active for patch in _patch_chain(owner, name)):
        return
    patch = MethodPatch(owner, name, around, vars(owner).get(name, _ABSENT))
    _LIVE_PATCHES.add(patch)
    setattr(owner, name, patch)


def remove_patches(owner: object | None) -> None:
    """Remove every :class:`MethodPatch` from ``owner``, restoring what was there before; one that something
    else wrapped is deactivated instead (it then only calls through), so nothing of ours acts after the run."""
    if owner is None or not hasattr(owner, "__dict__"):
        return
    for patch in [patch for patch in _LIVE_PATCHES if patch.owner is owner]:
        patch.active = False  # also those wrapped by someone else, which stay reachable through their wrapper
        _LIVE_PATCHES.discard(patch)
    for name, value in list(vars(owner).items()):
        if not isinstance(value, MethodPatch):
            continue
        chain = _patch_chain(owner, name)
        for patch in chain:
            patch.active = False
        restored = chain[-1].previous
        if restored is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, restored)


def _surgery_after(pl_module: pl.LightningModule, call_previous: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The ``setup`` / ``configure_model`` patch: the module's own method, then the attached Trainer's surgery."""
    result = call_previous(*args, **kwargs)
    trainer = attached_trainer(pl_module)
    if trainer is not None:
        run_surgery(trainer, pl_module)
    return result


def remove_run_patches(trainer: pl.Trainer, pl_module: pl.LightningModule | None) -> None:
    """Undo every patch a surgery callback made for this run: on the module and on the Trainer's strategy."""
    remove_patches(pl_module)
    remove_patches(trainer.strategy)


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
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            raise MisconfigurationException(
                f"{type(self).__name__} does not support DeepSpeed: DeepSpeed flattens parameters at wrap time. Use "
                "ModelParallelStrategy (FSDP2), FSDPStrategy, DDP or a single device."
            )
        self.reset_run_state()
        # Which Trainer and which callbacks is decided at each call, not here.
        patch_method(pl_module, "setup", _surgery_after)
        if is_overridden("configure_model", pl_module):
            patch_method(pl_module, "configure_model", _surgery_after)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # What `lightning-automodel export` needs: any LightningModule's checkpoint becomes exportable.
        record_export_info(pl_module, checkpoint)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        remove_run_patches(trainer, pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning skips teardown after an exception: a failed fit must not leave patches behind either.
        remove_run_patches(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if surgery_callbacks(trainer)[0] is not self:
            return  # one warning per fit, from the first surgery callback
        # Only a sharded (DCP) resume can fail on it; on one device and DDP the warning would cry wolf
        frozen_in_optimizer = any(
            not p.requires_grad for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]
        )
        if trainer.strategy.restore_checkpoint_after_setup and frozen_in_optimizer:
            rank_zero_warn(FROZEN_IN_OPTIMIZER_WARNING)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if surgery_callbacks(trainer)[:1] == [self]:  # one check per fit, from the first surgery callback (if listed)
            warn_resumed_without_optimizer_state(trainer, pl_module)


def warn_resumed_without_optimizer_state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """One warning when a single-device or DDP resume left trainable parameters without optimizer state.

    torch's ``Optimizer.load_state_dict`` restores state by position and leaves a parameter that had none
    (it never got a gradient, e.g. a vision tower trained on text) without any: it starts fresh, silently.
    Sharded strategies restore after setup; ``AtomicModelParallelStrategy`` reports those itself.
    """
    if not trainer.ckpt_path or trainer.strategy.restore_checkpoint_after_setup or trainer.global_step == 0:
        return
    names = {id(p): name for name, p in pl_module.named_parameters()}
    missing = sorted(
        names.get(id(p), "?")
        for optimizer in trainer.optimizers
        for group in optimizer.param_groups
        for p in group["params"]
        if p.requires_grad and not optimizer.state.get(p)
    )
    if missing:
        more = f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
        rank_zero_warn(
            f"Resumed from {trainer.ckpt_path}: {len(missing)} trainable parameters have no optimizer state in it "
            f"(they never got a gradient in the run that saved it) and start with fresh AdamW state: "
            f"{', '.join(missing[:10])}{more}. Freeze them (ParameterFreezing) if they should not train."
        )


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
