"""``lightning-automodel plan``: what a config will train and what it costs per rank, without a weight.

The model is built on the meta device (70B-class configs plan in about a second and a few hundred MB),
the configured surgery callbacks apply their core actions to it, and the result is printed: totals,
each frozen group with the rule that froze it, and FSDP2 bytes per rank.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from lightning_automodel.callbacks._lifecycle import ModelSurgeryCallback
from lightning_automodel.callbacks.cast_mixed_dtype import CastMixedDtypeToBF16
from lightning_automodel.callbacks.freeze_dead_parameters import FreezeDeadParameters
from lightning_automodel.callbacks.parameter_freezing import ParameterFreezing
from lightning_automodel.callbacks.parameter_summary import render_table
from lightning_automodel.core.checkpoint_files import format_bytes_human
from lightning_automodel.core.dead_params import freeze_dead_parameters
from lightning_automodel.core.dtypes import cast_floating_point, dtype_from_name
from lightning_automodel.core.memory import TrainingMemoryEstimate, estimate_training_memory
from lightning_automodel.core.parameters import ParameterCounts, count_parameters, module_breakdown
from lightning_automodel.models.hf_causal_lm import HFCausalLM

log = logging.getLogger(__name__)


@dataclass
class Plan:
    counts: ParameterCounts
    frozen_by: dict[str, str] = field(default_factory=dict)
    memory: TrainingMemoryEstimate | None = None
    model: nn.Module | None = None


def _instantiate(spec: dict[str, Any]) -> Any:
    module_name, _, class_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**(spec.get("init_args") or {}))


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config {str(path)!r} does not exist.")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping at the top level (model:, data:, trainer:).")
    return config


def world_size_from(trainer_config: dict[str, Any]) -> int:
    devices = trainer_config.get("devices", 1)
    devices = devices if isinstance(devices, int) and devices > 0 else (len(devices) if isinstance(devices, list) else 1)
    return devices * int(trainer_config.get("num_nodes", 1) or 1)


def surgery_callbacks(trainer_config: dict[str, Any]) -> list[ModelSurgeryCallback]:
    callbacks = []
    for spec in trainer_config.get("callbacks") or []:
        if isinstance(spec, dict) and "class_path" in spec:
            callback = _instantiate(spec)
            if isinstance(callback, ModelSurgeryCallback):
                callbacks.append(callback)
    return sorted(callbacks, key=lambda cb: cb.surgery_order)


def make_plan(config: dict[str, Any], *, world_size: int | None = None, optimizer_state_dtype: str = "float32") -> Plan:
    """Build the configured model on meta, apply the configured surgery, estimate per-rank memory."""
    model_args = dict(config.get("model") or {})
    model_args.pop("class_path", None)
    model_args = model_args.pop("init_args", model_args)
    trainer_config = config.get("trainer") or {}
    module = HFCausalLM(**model_args)
    model = module.build_model("meta")
    frozen_by: dict[str, str] = {}
    cast = False
    for callback in surgery_callbacks(trainer_config):
        # The same core actions the callbacks run in a fit; nothing here needs a Trainer.
        if isinstance(callback, ParameterFreezing):
            frozen_by.update(callback.freeze(model))
        elif isinstance(callback, FreezeDeadParameters):
            frozen_by.update(freeze_dead_parameters(model))
        elif isinstance(callback, CastMixedDtypeToBF16):
            cast_floating_point(model, torch.bfloat16, cast_buffers=callback.cast_buffers)
            cast = True
    precision = str(trainer_config.get("precision", ""))
    param_dtype = torch.bfloat16 if cast or precision.startswith("bf16-true") else None
    strategy = trainer_config.get("strategy")
    strategy_name = strategy if isinstance(strategy, str) else (strategy or {}).get("class_path", "")
    sharded = "ModelParallel" in strategy_name or "fsdp" in strategy_name.lower()
    size = world_size or world_size_from(trainer_config)
    memory = estimate_training_memory(
        model,
        world_size=size,
        param_dtype=param_dtype,
        optimizer_state_dtype=dtype_from_name(optimizer_state_dtype),
        sharded=sharded or world_size is not None,
    )
    return Plan(count_parameters(model), frozen_by, memory, model)


def format_plan(plan: Plan) -> str:
    counts, memory = plan.counts, plan.memory
    rows = module_breakdown(plan.model, depth=2, frozen_by=plan.frozen_by)
    table = render_table(
        ["Module", "Params", "Trainable", "Frozen by"],
        [[r.name, f"{r.total:,}", f"{r.trainable:,}", ", ".join(f"{k} ({v:,})" for k, v in sorted(r.frozen_by.items())) or "-"] for r in rows],
    )
    rules: dict[str, int] = {}
    for rule in plan.frozen_by.values():
        rules[rule] = rules.get(rule, 0) + 1
    pct = 100.0 * counts.trainable / counts.total if counts.total else 0.0
    lines = [
        table,
        f"Trainable parameters: {counts.trainable:,} of {counts.total:,} ({pct:.2f}%)",
        "Frozen groups: " + (", ".join(f"{rule}: {n} tensors" for rule, n in sorted(rules.items())) or "none"),
    ]
    if memory is not None:
        lines.append(
            f"Per rank at world size {memory.world_size}: params {format_bytes_human(memory.param_bytes)}, "
            f"grads {format_bytes_human(memory.grad_bytes)}, optimizer state {format_bytes_human(memory.optimizer_bytes)}, "
            f"total {format_bytes_human(memory.total_bytes)} (activations not included)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="lightning-automodel plan", description=__doc__)
    parser.add_argument("--config", "-c", required=True, help="the YAML you would pass to `fit`")
    parser.add_argument("--world_size", type=int, default=None, help="ranks to shard over (default: the trainer's devices x num_nodes)")
    parser.add_argument("--optimizer_state_dtype", default="float32")
    args = parser.parse_args(list(argv))
    plan = make_plan(load_config(args.config), world_size=args.world_size, optimizer_state_dtype=args.optimizer_state_dtype)
    print(format_plan(plan))
    return 0
