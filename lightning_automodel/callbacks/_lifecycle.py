"""When model surgery runs: Lightning has no callback hook between ``configure_model`` and ``configure_optimizers``.

So, for one Trainer run, the first surgery callback patches the module's ``setup`` and ``configure_model`` and the
strategy's ``load_checkpoint`` (sharded strategies load optimizer state there, before any callback hook) on the
instances, removed at ``teardown``/``on_exception``: after any fit the module pickles and deep-copies untouched."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
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
from lightning_automodel.core.logs import rank_zero_logger
from lightning_automodel.core.naming import canonical_name, unique_named_parameters
from lightning_automodel.core.training_checkpoint_reader import read_checkpoint_metadata
from lightning_automodel.strategies import preview

log = rank_zero_logger(__name__)  # one line per job: rank 0's

#: The ``weights_dtype`` cast: after LoRA (5), so peft makes fp32 adapters on fp32 weights; before freezing (10).
WEIGHTS_DTYPE_ORDER = 7

#: Measured with torch 2.13 (tests/scripts/cb_frozen_in_optimizer.py); one device resumes in that case too.
FROZEN_IN_OPTIMIZER_WARNING = (
    "The optimizer holds frozen parameters. They get no gradient and no optimizer state: training works, and so "
    "does a resume with the same frozen set. One case fails: a sharded (DCP) resume in which some of them are trainable again (the new optimizer asks "
    "for state the checkpoint does not have: `Missing key in checkpoint state_dict: optimizer_0.state...`). "
    "ParameterFreezing prevents that by re-applying the checkpoint's frozen set; to rule it out altogether, build "
    "the optimizer from trainable parameters only: `[p for p in self.parameters() if p.requires_grad]`."
)


def saved_state(callback_states: Mapping[str, Any], state_key: str) -> Mapping[str, Any] | None:
    """The state saved under ``state_key``, or under an older ``state_key{...}`` key when unambiguous."""
    if state_key in callback_states:
        return callback_states[state_key]
    legacy = [k for k in callback_states if isinstance(k, str) and k.startswith(state_key + "{")]
    return callback_states[legacy[0]] if len(legacy) == 1 else None


def read_callback_states(checkpoint_path: Any) -> Mapping[str, Any] | None:
    """A checkpoint's ``callbacks`` entry, read as data (never plain pickle); None when unreadable."""
    path = Path(checkpoint_path)
    if not path.exists():
        return None
    try:
        callbacks = read_checkpoint_metadata(path).get("callbacks")
    except Exception as exc:  # noqa: BLE001 - the strategy's own load reports it
        log.debug("Could not read the callback state of %s early: %s", path, exc)
        return None
    return callbacks if isinstance(callbacks, Mapping) else None


@dataclass(frozen=True)
class FrozenSetDiff:
    """How the model's frozen set differs from a checkpoint's (canonical names, sorted)."""

    to_freeze: list[str]  # the checkpoint froze them, this run would train them
    to_unfreeze: list[str]  # the checkpoint trained them, this run would freeze them
    missing: list[str]  # the checkpoint froze them, the model has no such parameter

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


def parameters_by_canonical_name(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every name a parameter has (tied ones too), canonical: a frozen set may name either alias."""
    return {canonical_name(n): p for n, p in model.named_parameters(remove_duplicate=False)}


def frozen_set_diff(model: nn.Module, frozen: Iterable[str], *, scope: Iterable[str] | None = None) -> FrozenSetDiff:
    """Compare the model's frozen parameters with ``frozen`` (within ``scope``, default all parameters)."""
    frozen = set(frozen)
    params = parameters_by_canonical_name(model)
    names = set(params) if scope is None else set(scope) & set(params)
    current = {n for n in names if not params[n].requires_grad}
    return FrozenSetDiff(
        to_freeze=sorted((frozen & names) - current),
        to_unfreeze=sorted(current - frozen),
        missing=sorted(frozen - set(params)),
    )


def apply_frozen_set(model: nn.Module, diff: FrozenSetDiff) -> None:
    params = parameters_by_canonical_name(model)
    for name in diff.to_freeze:
        params[name].requires_grad_(False)
    for name in diff.to_unfreeze:
        params[name].requires_grad_(True)


def frozen_names(model: nn.Module) -> list[str]:
    """Canonical names of the model's frozen parameters (each tensor once)."""
    return sorted(name for name, p in unique_named_parameters(model) if not p.requires_grad)


class SurgeryStep(Protocol):
    surgery_order: int


class WeightsDtypeCast:
    """The job's ``weights_dtype`` as a surgery step: a model setting, not a callback (fit and plan both run it)."""

    surgery_order: int = WEIGHTS_DTYPE_ORDER

    def __init__(self, cast: Callable[[nn.Module], object]) -> None:
        self.apply_to_model = cast


def surgery_schedule(
    callbacks: Iterable[Callback], weights_cast: Callable[[nn.Module], object] | None = None
) -> list[SurgeryStep]:
    """THE order of surgery, for ``fit`` and ``plan``: LoRA (5), weights dtype (7), freeze (10), dead
    parameters (20), mixed cast (30), tie (40), summary (50); equal orders keep the order given."""
    steps: list[SurgeryStep] = [cb for cb in callbacks if isinstance(cb, ModelSurgeryCallback)]
    if weights_cast is not None:
        steps.append(WeightsDtypeCast(weights_cast))
    return sorted(steps, key=lambda step: step.surgery_order)


def surgery_callbacks(trainer: pl.Trainer | None) -> list[ModelSurgeryCallback]:
    """The Trainer's surgery callbacks in ``surgery_order``; none without a Trainer."""
    return [step for step in surgery_schedule(trainer.callbacks if trainer else []) if isinstance(step, ModelSurgeryCallback)]


def attached_trainer(pl_module: pl.LightningModule | None) -> pl.Trainer | None:
    """The Trainer the module is attached to right now, or None (called outside a Trainer run)."""
    try:
        return pl_module.trainer if pl_module is not None else None
    except RuntimeError:  # "... is not attached to a `Trainer`"
        return None


def prepare_before_sharding(
    pl_module: pl.LightningModule, model: nn.Module | None = None, *, weights_cast: Callable[[nn.Module], object] | None = None
) -> None:
    """Run the surgery that must precede FSDP2 sharding (LoRA, then ``weights_cast``). A module that shards its own
    model in ``configure_model`` calls ``prepare_before_sharding(self, self.model)`` before ``fully_shard``."""
    trainer = attached_trainer(pl_module)
    model = model if model is not None else find_hf_model(pl_module)[1]
    for step in surgery_schedule(trainer.callbacks if trainer else [], weights_cast):
        if isinstance(step, WeightsDtypeCast):
            step.apply_to_model(model)
        else:
            step.apply_before_sharding(trainer, pl_module, model)


def run_surgery(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Run the Trainer's surgery callbacks on the target model, then check ranks agree and something trains."""
    callbacks = surgery_callbacks(trainer)
    _, model = find_hf_model(pl_module)
    if not callbacks or not any(True for _ in model.parameters()):
        return  # nothing to do, or built later, in configure_model
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


class MethodPatch:
    """``owner.<name>`` replaced on the instance by ``around(owner, previous, *args)``, for one Trainer run.
    Not a closure: the owner stays picklable and a deep copy's patch acts on the copy."""

    def __init__(self, owner: Any, name: str, around: Callable[..., Any]) -> None:
        self.owner, self.name, self.around = owner, name, around
        self.previous = vars(owner).get(name)
        self.active = True
        setattr(owner, name, self)

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        # Lightning's is_overridden unwraps __wrapped__: a patched configure_model still counts as overridden.
        return self.previous or getattr(type(self.owner), self.name).__get__(self.owner)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.active:  # removed, but something that wrapped it after us still calls it: call through
            return self.__wrapped__(*args, **kwargs)
        return self.around(self.owner, self.__wrapped__, *args, **kwargs)

    def remove(self) -> None:
        """Put back what was there; if something wrapped us meanwhile, stay as an inactive pass-through."""
        self.active = False
        if vars(self.owner).get(self.name) is self:
            if self.previous is None:
                delattr(self.owner, self.name)
            else:
                setattr(self.owner, self.name, self.previous)


def _surgery_after(pl_module: pl.LightningModule, previous: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The ``setup`` / ``configure_model`` patch: the module's own method, then the attached Trainer's surgery."""
    result = previous(*args, **kwargs)
    trainer = attached_trainer(pl_module)
    if trainer is not None:
        run_surgery(trainer, pl_module)
    return result


def _load_through_callbacks(strategy: pl.strategies.Strategy, load: Callable[..., Any], checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
    """The ``strategy.load_checkpoint`` patch: each surgery callback's ``around_checkpoint_load``, in surgery order."""
    trainer = attached_trainer(strategy.lightning_module)
    run = functools.partial(load, checkpoint_path, *args, **kwargs)
    for callback in reversed(surgery_callbacks(trainer)):
        run = functools.partial(callback.around_checkpoint_load, trainer, checkpoint_path, run)
    return run()


class ModelSurgeryCallback(Callback):
    """Base class: subclasses set ``surgery_order`` and override the hooks they need. ``state_key`` is the
    class name whatever the arguments: a resume with changed arguments still finds the saved state."""

    surgery_order: ClassVar[int] = 100

    def __init__(self) -> None:
        self.reset_run_state()
        self._patches: list[MethodPatch] = []

    def reset_run_state(self) -> None:
        """Forget everything from a previous run (override and call ``super()``)."""
        self.frozen: dict[str, str] = {}  # canonical parameter name -> the rule that froze it, in this run
        self.surgery_runs = 0  # completed surgery passes in this run (0 during the first: log only then)

    def apply_surgery(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module) -> None:
        """Change the model after it is built (and after ``configure_model``); the base changes nothing."""

    def apply_before_sharding(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule, model: nn.Module) -> None:
        """Change the unsharded (meta) model before FSDP2 shards it; the base changes nothing."""

    def around_checkpoint_load(self, trainer: pl.Trainer, checkpoint_path: Any, load: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Wrap the strategy's ``load_checkpoint`` (which loads a sharded optimizer's state); the base just loads."""
        return load()

    def log_first(self, message: str) -> None:
        """``ClassName: message``, in the first surgery pass of a run only."""
        if self.surgery_runs == 0:
            log.info(f"{type(self).__name__}: {message}")

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            raise MisconfigurationException(
                f"{type(self).__name__} does not support DeepSpeed: DeepSpeed flattens parameters at wrap time. Use "
                "ModelParallelStrategy (FSDP2), FSDPStrategy, DDP or a single device."
            )
        self.reset_run_state()
        if surgery_callbacks(trainer)[0] is not self:
            return  # the first surgery callback patches, once per run
        self.teardown(trainer, pl_module, stage)  # nothing left from a run that ended without teardown
        self._patches = [MethodPatch(pl_module, "setup", _surgery_after), MethodPatch(trainer.strategy, "load_checkpoint", _load_through_callbacks)]
        if is_overridden("configure_model", pl_module):
            self._patches.append(MethodPatch(pl_module, "configure_model", _surgery_after))

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # What `lightning-automodel export` needs: any LightningModule's checkpoint becomes exportable.
        record_export_info(pl_module, checkpoint)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for patch in reversed(self._patches):
            patch.remove()
        self._patches = []

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "exception")  # Lightning skips teardown after an exception

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # One warning per fit, from the first surgery callback; only a sharded (DCP) resume can fail on it
        if surgery_callbacks(trainer)[0] is not self or not trainer.strategy.restore_checkpoint_after_setup:
            return
        params = (p for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"])
        if any(not p.requires_grad for p in params):
            rank_zero_warn(FROZEN_IN_OPTIMIZER_WARNING)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if surgery_callbacks(trainer)[:1] == [self]:  # one check per fit, from the first surgery callback (if listed)
            warn_resumed_without_optimizer_state(trainer, pl_module)


def warn_resumed_without_optimizer_state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Warn when a single-device or DDP resume left trainable parameters without optimizer state: torch restores it
    by position, and one that had none (never got a gradient) silently starts fresh."""
    if not trainer.ckpt_path or trainer.strategy.restore_checkpoint_after_setup or trainer.global_step == 0:
        return
    names = {id(p): name for name, p in pl_module.named_parameters()}
    missing = [
        names.get(id(p), "?")
        for optimizer in trainer.optimizers
        for group in optimizer.param_groups
        for p in group["params"]
        if p.requires_grad and not optimizer.state.get(p)
    ]
    if missing:
        rank_zero_warn(
            f"Resumed from {trainer.ckpt_path}: {len(missing)} trainable parameters have no optimizer state in it "
            f"(they never got a gradient in the run that saved it) and start with fresh AdamW state: "
            f"{preview(missing)}. Freeze them (ParameterFreezing) if they should not train."
        )
