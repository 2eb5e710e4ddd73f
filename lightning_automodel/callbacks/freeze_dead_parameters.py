"""Freeze parameters that can never receive a gradient, and find the ones nobody wrote a rule for."""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_automodel.callbacks._lifecycle import ModelSurgeryCallback, apply_frozen_set, frozen_set_diff, saved_state
from lightning_automodel.strategies import preview
from lightning_automodel.core.dead_params import freeze_dead_parameters
from lightning_automodel.core.discovery import find_hf_model
from lightning_automodel.core.distributed import digest_names
from lightning_automodel.core.naming import unique_named_parameters


class FreezeDeadParameters(ModelSurgeryCallback):
    """Freeze dead parameters (Gemma KV sharing, DeepSeek V4 and MiniMax M3 indexers), and detect others.

    A parameter that never gets a gradient has no optimizer state, and a sharded ``ModelParallelStrategy`` resume
    fails with ``Missing key in checkpoint state_dict``. Known cases are frozen after ``ParameterFreezing``; others
    (no gradient on any rank in the first ``detect_steps`` backward passes) are named with a freezing selector.

    Args:
        detect_steps: backward passes to watch (a mixture-of-experts expert may miss one batch); 0: no detection.
    """

    surgery_order: ClassVar[int] = 20

    def __init__(self, detect_steps: int = 3) -> None:
        if detect_steps < 0:
            raise ValueError(f"detect_steps must be >= 0; got {detect_steps}.")
        super().__init__()
        self.detect_steps = detect_steps

    @override
    def reset_run_state(self) -> None:
        super().reset_run_state()
        self.unused: list[str] = []
        self._watched: list[str] = []  # names, watched from train start: the objects change under FSDP2

    @override
    def apply_surgery(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module) -> None:
        self.frozen = freeze_dead_parameters(model)
        if self.frozen:
            self.log_first(f"froze {len(self.frozen)} dead parameter tensors.")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._seen_backward = 0
        self._alive: set[str] = set()
        self._watched = [name for name, p in unique_named_parameters(find_hf_model(pl_module)[1]) if p.requires_grad]

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._watched or self._seen_backward >= self.detect_steps:
            return
        self._seen_backward += 1
        with_grad = {name for name, p in unique_named_parameters(find_hf_model(pl_module)[1]) if p.grad is not None}
        self._alive.update(name for name in self._watched if name in with_grad)
        if self._seen_backward == self.detect_steps:
            self._report(trainer)
            self._watched = []

    def _report(self, trainer: pl.Trainer) -> None:
        # Through the strategy, on its device (NCCL has no CPU tensors); every rank watches the same names in order.
        flags = [1 if name in self._alive else 0 for name in self._watched]
        alive = torch.tensor(flags, dtype=torch.int32, device=trainer.strategy.root_device)
        alive = trainer.strategy.reduce(alive, reduce_op=dist.ReduceOp.MAX)
        self.unused = [name for name, flag in zip(self._watched, alive.tolist()) if flag == 0]
        if not self.unused:
            return
        shown = self.unused[:20]
        selectors = "\n".join(f"    - {{path: {path}}}" for path in self._selector_paths(self.unused)[:20])
        rank_zero_warn(
            f"FreezeDeadParameters: {len(self.unused)} trainable parameter tensors received no gradient on any rank in the "
            f"first {self.detect_steps} backward passes: {', '.join(shown)}"
            f"{' ...' if len(self.unused) > len(shown) else ''}. A checkpoint has no optimizer state for them "
            f"(`Missing key in checkpoint state_dict: optimizer_0.state.{find_hf_model(trainer.lightning_module)[0]}{shown[0]}.step` "
            "from a plain ModelParallelStrategy resume; AtomicModelParallelStrategy starts them fresh with a warning). "
            f"If they are dead, freeze them (a resume keeps them frozen):\n  ParameterFreezing:\n    freeze_modules:\n{selectors}"
        )

    def _selector_paths(self, unused: list[str]) -> list[str]:
        """For each unused parameter, the outermost module whose watched parameters are all unused (else the parameter)."""
        watched = Counter(m for name in self._watched for m in _module_prefixes(name))
        dead = Counter(m for name in unused for m in _module_prefixes(name))
        paths = (next((m for m in _module_prefixes(name) if dead[m] == watched[m]), name) for name in unused)
        return list(dict.fromkeys(paths))

    @override
    def state_dict(self) -> dict[str, Any]:
        names = sorted(self.frozen)
        return {"frozen": names, "digest": digest_names(names), "unused": list(self.unused)}

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Re-apply the checkpoint's dead set (runs without ParameterFreezing, restoring before the optimizer)."""
        state = saved_state(checkpoint.get("callbacks", {}), self.state_key)
        if state is None or trainer.state.fn != "fit":
            return
        saved = set(state.get("frozen", []))
        model = find_hf_model(pl_module)[1]
        diff = frozen_set_diff(model, saved, scope=saved | set(self.frozen))
        if not diff:
            return
        if trainer.strategy.restore_checkpoint_after_setup:
            raise MisconfigurationException(
                f"FreezeDeadParameters: the dead parameters of the checkpoint differ from this run's: {diff.describe()}. "
                "Add ParameterFreezing (it re-applies the checkpoint's frozen set before the optimizer state loads)."
            )
        apply_frozen_set(model, diff)
        rank_zero_warn(
            f"FreezeDeadParameters: re-applying the checkpoint's dead set: {diff.describe()}"
            + (f"; not in this model: {preview(diff.missing)}" if diff.missing else "")
            + "."
        )


def _module_prefixes(name: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b"]``: the modules that own a parameter, outermost first."""
    parts = name.split(".")[:-1]
    return [".".join(parts[: i + 1]) for i in range(len(parts))]
