"""Freeze parameters that can never receive a gradient, and find the ones nobody wrote a rule for."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_automodel.callbacks._lifecycle import ModelSurgeryCallback, coordinator_for, target_model
from lightning_automodel.callbacks._resume import reapply_frozen_set
from lightning_automodel.core.dead_params import freeze_dead_parameters
from lightning_automodel.core.distributed import digest_names
from lightning_automodel.core.naming import unique_named_parameters

log = logging.getLogger(__name__)


class FreezeDeadParameters(ModelSurgeryCallback):
    """Freeze dead parameters (Gemma KV sharing, DeepSeek V4 and MiniMax M3 indexers), and detect others.

    A trainable parameter that never gets a gradient gets no optimizer state, and a sharded resume then
    fails with ``Missing key in checkpoint state_dict: optim.state.<name>.step``. Known cases are frozen
    by rule, after ``ParameterFreezing`` (so no unfreeze selector revives them). For every other model,
    the first ``detect_steps`` backward passes are watched: a trainable parameter that received no
    gradient on any rank in any of them is named on rank 0, with the selector that freezes it.

    Args:
        detect_steps: backward passes to watch (a mixture-of-experts expert may miss one batch);
            0 disables detection. After them the callback costs nothing.
    """

    surgery_order: ClassVar[int] = 20

    def __init__(self, detect_steps: int = 3) -> None:
        if detect_steps < 0:
            raise ValueError(f"detect_steps must be >= 0; got {detect_steps}.")
        self.detect_steps = detect_steps
        self.frozen: dict[str, str] = {}
        self.unused: list[str] = []
        self._seen_backward = 0
        self._alive: set[str] = set()
        self._watch: list[tuple[str, nn.Parameter]] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(detect_steps=self.detect_steps)

    @override
    def apply_surgery(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module) -> None:
        self.frozen = freeze_dead_parameters(model)
        coordinator = coordinator_for(pl_module)
        coordinator.frozen_by.update(self.frozen)
        if self.frozen and coordinator.runs == 0:
            rank_zero_info(f"FreezeDeadParameters: froze {len(self.frozen)} dead parameter tensors.")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_backward = 0
        self._alive = set()
        _, model = target_model(pl_module)
        self._watch = [(name, p) for name, p in unique_named_parameters(model) if p.requires_grad]

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._seen_backward >= self.detect_steps or not self._watch:
            return
        self._seen_backward += 1
        self._alive.update(name for name, p in self._watch if p.grad is not None)
        if self._seen_backward == self.detect_steps:
            self._report(trainer, pl_module)
            self._watch = []

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # On the strategy's device and through the strategy: NCCL has no CPU tensors. A parameter that
        # got a gradient on any rank is alive.
        flags = [1 if name in self._alive else 0 for name, _ in self._watch]
        alive = torch.tensor(flags, dtype=torch.int32, device=trainer.strategy.root_device)
        alive = trainer.strategy.reduce(alive, reduce_op=dist.ReduceOp.MAX)
        self.unused = [name for (name, _), flag in zip(self._watch, alive.tolist()) if flag == 0]
        if not self.unused:
            return
        shown = self.unused[:20]
        selectors = "\n".join(f"    - {{path: {path}}}" for path in self._selector_paths(self.unused)[:20])
        rank_zero_warn(
            f"FreezeDeadParameters: {len(self.unused)} trainable parameter tensors received no gradient on any rank in the "
            f"first {self.detect_steps} backward passes: {', '.join(shown)}"
            f"{' ...' if len(self.unused) > len(shown) else ''}. A sharded (DCP) resume will fail on them with "
            f"`Missing key in checkpoint state_dict: optim.state.{shown[0]}.step`. If they are dead, freeze them:\n"
            f"  ParameterFreezing:\n    freeze_modules:\n{selectors}"
        )

    def _selector_paths(self, unused: list[str]) -> list[str]:
        """The module path when every watched parameter of that module is unused, else the parameter path."""
        by_module: dict[str, list[str]] = {}
        for name, _ in self._watch:
            by_module.setdefault(name.rpartition(".")[0], []).append(name)
        dead = set(unused)
        paths: list[str] = []
        for name in unused:
            module = name.rpartition(".")[0]
            path = module if module and all(n in dead for n in by_module.get(module, [])) else name
            if path not in paths:
                paths.append(path)
        return paths

    @override
    def state_dict(self) -> dict[str, Any]:
        names = sorted(self.frozen)
        return {"frozen": names, "digest": digest_names(names), "unused": list(self.unused)}

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:
            return
        saved = set(state.get("frozen", []))
        if saved != set(self.frozen):
            reapply_frozen_set(
                trainer, target_model(pl_module)[1], saved, owner="FreezeDeadParameters", scope=saved | set(self.frozen)
            )
