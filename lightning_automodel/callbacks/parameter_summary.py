"""A parameter summary once the run is set up and restored: what trains, what froze it, what it costs per rank."""

from __future__ import annotations

from typing import ClassVar

import lightning.pytorch as pl
from torch import nn
from typing_extensions import override

from lightning_automodel.callbacks._lifecycle import ModelSurgeryCallback, surgery_callbacks
from lightning_automodel.core.discovery import find_hf_model
from lightning_automodel.core.hf_weight_files import format_bytes_human
from lightning_automodel.core.logs import rank_zero_logger
from lightning_automodel.core.memory import estimate_training_memory
from lightning_automodel.core.parameters import module_breakdown, parameter_stats

log = rank_zero_logger(__name__)  # one summary per job: rank 0's


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain aligned table in the style of Lightning's ModelSummary."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    last = len(headers) - 1
    line = lambda cells: " | ".join(
        c.ljust(w) if i in (0, last) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    ).rstrip()
    out = [line(headers), "-" * (sum(widths) + 3 * (len(widths) - 1))]
    out.extend(line(r) for r in rows)
    return "\n".join(out)


def memory_scope(strategy: str, world_size: int) -> str:
    """What the per-rank bytes describe: a shard of the state (FSDP) or a full replica (DDP)."""
    if strategy == "sharded":
        return f"Per rank (FSDP, state sharded over {world_size} ranks)"
    if world_size > 1:
        return f"Per rank (DDP: each of {world_size} ranks holds a full replica)"
    return "Per device (one process)"


class ParameterSummary(ModelSurgeryCallback):
    """Log, once per fit and on rank 0, what trains and what it costs.

    Parameter counts, global L2 norm, a table by module with the rule that froze each part, and the bytes per
    rank; at ``on_train_start``, after sharding, casts and a resume's restore (the weights that train).

    Args:
        name: the model's name in the summary.
        depth: module path components per table row (2: ``model.layers``, ``lm_head``).
    """

    surgery_order: ClassVar[int] = 50

    def __init__(self, name: str = "Model", depth: int = 2) -> None:
        super().__init__()
        self.name = name
        self.depth = depth

    @override
    def reset_run_state(self) -> None:
        super().reset_run_state()
        self.text: str | None = None

    def summarize(
        self, trainer: pl.Trainer | None, pl_module: nn.Module, model: nn.Module, world_size: int, scope: str | None = None
    ) -> str:
        # A collective for sharded models (every rank calls it), on the strategy's device: NCCL has no CPU path.
        device = trainer.strategy.root_device if trainer is not None else None
        stats = parameter_stats(model, device=device)
        rules = {name: rule for cb in surgery_callbacks(trainer) for name, rule in cb.frozen.items()} if isinstance(trainer, pl.Trainer) else {}
        rows = [
            [r.name, _count(r.total), _count(r.trainable), ", ".join(f"{rule} ({_count(n)})" for rule, n in sorted(r.frozen_by.items())) or "-"]
            for r in module_breakdown(model, depth=self.depth, frozen_by=rules)
        ]
        # Each parameter's own dtype, as it is now: AdamW keeps its state in it (zeros_like(param)).
        memory = estimate_training_memory(model, world_size=world_size, optimizer_state_dtype=None, sharded=world_size > 1)
        scope = scope or memory_scope("sharded" if world_size > 1 else "replica", world_size)
        pct = 100.0 * stats.trainable / stats.total if stats.total else 0.0
        return "\n".join(
            [
                f"{self.name} summary:",
                render_table(["Module", "Params", "Trainable", "Frozen by"], rows),
                f"Trainable parameters: {stats.trainable:,} of {stats.total:,} ({pct:.2f}%)",
                f"Param L2 norm (global): {stats.l2_norm:.4f}",
                f"{scope}: params {format_bytes_human(memory.param_bytes)}, grads {format_bytes_human(memory.grad_bytes)}, "
                f"optimizer state {format_bytes_human(memory.optimizer_bytes)}, total {format_bytes_human(memory.total_bytes)}",
            ]
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._summarize_run(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.text is None:  # no training step ran (max_steps 0, or already at max_steps): still say what would train
            self._summarize_run(trainer, pl_module)

    def _summarize_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        sharded = isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))
        _, model = find_hf_model(pl_module)
        scope = memory_scope("sharded" if sharded else "replica", trainer.world_size)
        self.text = self.summarize(trainer, pl_module, model, trainer.world_size if sharded else 1, scope)
        log.info(self.text)
