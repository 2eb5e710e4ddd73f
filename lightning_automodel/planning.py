"""``lightning-automodel plan``: what a config will train and what it costs per rank, without a weight.

The model is built on the meta device from its config alone (a directory holding only ``config.json``
is enough: no weights, no tokenizer), the configured surgery callbacks apply their core actions to it
in the order ``fit`` applies them (:func:`~lightning_automodel.callbacks._lifecycle.surgery_schedule`),
and the result is printed: each module with what froze it, totals, and the per-rank memory of the
job's FSDP2 layout with and without CPU offload. No Trainer is created, so an 8-GPU config plans on a
laptop.

The command line is ``fit``'s, parsed by ``fit``'s own parser (:func:`~lightning_automodel.cli.parse_fit_config`),
plus ``--world_size``, ``--node_host_memory`` and ``--optimizer_state_dtype``. A config is data: only
callbacks from ``lightning_automodel.callbacks`` are instantiated, and only class paths on the
configuration import allow-list are ever imported (by the parser, to check them).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
import re
import sys
from argparse import ArgumentError
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_automodel import callbacks as _callbacks_pkg
from lightning_automodel._compat.lightning import import_path_policy_preserved
from lightning_automodel.callbacks._lifecycle import ModelSurgeryCallback, SurgeryStep, WeightsDtypeCast, surgery_schedule
from lightning_automodel.callbacks.cast_mixed_dtype import CastMixedDtypeToBF16
from lightning_automodel.callbacks.freeze_dead_parameters import FreezeDeadParameters
from lightning_automodel.callbacks.lora import LoRA
from lightning_automodel.callbacks.parameter_freezing import ParameterFreezing
from lightning_automodel.callbacks.parameter_summary import ParameterSummary, render_table
from lightning_automodel.callbacks.tied_lm_head import TiedLMHead
from lightning_automodel.core.hf_weight_files import format_bytes_human
from lightning_automodel.core.dead_params import freeze_dead_parameters
from lightning_automodel.core.dtypes import cast_floating_point, dtype_from_name
from lightning_automodel.core.fsdp_layout import fsdp2_groups
from lightning_automodel.core.lora import LoraConfigError, adapter_parameter_count
from lightning_automodel.core.memory import (
    FSDP2MemoryEstimate,
    TrainingMemoryEstimate,
    estimate_fsdp2_peak,
    estimate_training_memory,
)
from lightning_automodel.core.naming import unique_named_parameters
from lightning_automodel.core.parameters import ParameterCounts, count_parameters, module_breakdown
from lightning_automodel.core.tied_head import ensure_tied_lm_head
from lightning_automodel.config_loading import PlanError
from lightning_automodel.core import model_build as building

log = logging.getLogger(__name__)

PROG = "lightning-automodel plan"
#: from this depth on, plan says that it is building (a progress line: every layer is constructed, as in fit)
_MANY_LAYERS = 2000
_MEMORY_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# ---- the command line: fit's parser plus plan's own options -----------------------------------------


@dataclass(frozen=True)
class PlanOptions:
    world_size: int | None = None
    node_host_memory: int = 10**12
    optimizer_state_dtype: str | None = None


def _add_plan_arguments(parser: Any) -> None:
    parser.add_argument("--world_size", type=int | None, default=None,
                        help="data-parallel ranks to shard over (default: the strategy's data_parallel_size, else devices x num_nodes)")
    parser.add_argument("--node_host_memory", type=str, default="1TB",
                        help="host memory of one node, e.g. 1TB (default), 2TiB, 768GB: the per-node check of cpu_offload's pinned state")
    parser.add_argument("--optimizer_state_dtype", type=str | None, default=None,
                        help="dtype of the AdamW state (default: the parameter's dtype, which is what AdamW allocates)")


def parse_size(text: str) -> int:
    """``1TB``, ``2TiB``, ``768GB`` -> bytes (a positive size, or a one-line PlanError)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    factor = _MEMORY_UNITS.get(match.group(2).upper()) if match else None
    if match is None or factor is None or float(match.group(1)) <= 0:
        raise PlanError(f"--node_host_memory: expected a positive size such as 1TB, 2TiB or 768GB; got {text!r}")
    return int(float(match.group(1)) * factor)


def parse_args(argv: Sequence[str]) -> tuple[PlanOptions, dict[str, Any]]:
    """``plan``'s options and the config as ``fit`` would parse ``argv`` (merged, defaults filled, checked)."""
    from lightning_automodel.cli import parse_fit_config

    config = parse_fit_config(list(argv), add_arguments=_add_plan_arguments)
    world_size = config.pop("world_size", None)
    if world_size is not None and world_size < 1:
        raise PlanError(f"--world_size: must be >= 1 (the number of ranks to shard over); got {world_size}")
    node_memory = parse_size(config.pop("node_host_memory", "1TB"))
    return PlanOptions(world_size, node_memory, config.pop("optimizer_state_dtype", None)), config


# ---- building the model without weights ------------------------------------------------------------


def hf_config_from(model_args: Mapping[str, Any]) -> Any:
    """The Hugging Face config: ``config.json`` of a local directory (weights not needed) or the inline config."""
    path, inline = model_args.get("pretrained_path"), model_args.get("config")
    if (path is None) == (inline is None):
        raise PlanError("model needs exactly one of `pretrained_path` (a local model directory) or `config` (inline).")
    if path is None:
        return building.inline_config(inline)  # a mapping: the parser checked model.config's type
    root = Path(str(path))
    if not (root / "config.json").is_file():
        building.check_local_model_dir(str(path))  # raises the job's message: missing (a hub name?), a file, no config.json
    building.check_config_json(root / "config.json")  # bounded size and depth, as fit checks it (no weights needed here)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(root), local_files_only=True, trust_remote_code=bool(model_args.get("trust_remote_code", False)))


def build_meta(model_args: Mapping[str, Any]) -> nn.Module:
    """The model on meta in fp32 (``weights_dtype`` is applied afterwards, as the job does)."""
    config = hf_config_from(model_args)
    layers = getattr(_text_config(config), "num_hidden_layers", 0) or 0
    if layers >= _MANY_LAYERS:
        # Every layer is constructed as in `fit` (no storage: on meta): about 0.5 ms per layer here.
        log.warning("plan: building %d layers on the meta device (about %d s)...", layers, max(1, layers // 2000))
    return building.build_meta_model(
        config,
        model_args.get("model_class", "auto"),
        trust_remote_code=bool(model_args.get("trust_remote_code", False)),
    )


# ---- callbacks: an allow-list, never an import of a name from the YAML -------------------------------


def _callback_class(class_path: str) -> type | None:
    """The package's callback class that ``class_path`` names (short, package or module path); ``None`` otherwise.
    Only modules of this package are ever imported here."""
    classes = {getattr(_callbacks_pkg, name) for name in _callbacks_pkg.__all__}
    module, _, name = class_path.rpartition(".")
    if module and module != "lightning_automodel" and not module.startswith("lightning_automodel."):
        return None
    try:
        cls = getattr(importlib.import_module(module) if module else _callbacks_pkg, name, None)
    except ImportError:
        return None
    return cls if isinstance(cls, type) and cls in classes else None


def _instantiate(cls: type, init_args: Mapping[str, Any]) -> Any:
    """``cls(**init_args)`` as fit's parser instantiates it (nested dataclasses such as LoRA's ``runtime_config`` too)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callback", type=cls)
    spec = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(init_args)}
    return parser.instantiate_classes(parser.parse_object({"callback": spec})).callback


def surgery_callbacks(trainer_config: Mapping[str, Any]) -> list[ModelSurgeryCallback]:
    """The configured surgery callbacks (and ParameterSummary), instantiated only from the allow-list.

    Other class paths (Lightning's ``ModelCheckpoint``, a trusted project's callback) do no surgery:
    they are skipped, never instantiated; an entry that is not from Lightning gets a one-line note.
    """
    specs = trainer_config.get("callbacks") or []
    out: list[ModelSurgeryCallback] = []
    for i, spec in enumerate([specs] if isinstance(specs, Mapping) else specs):
        class_path = spec.get("class_path") if isinstance(spec, Mapping) else spec
        cls = _callback_class(class_path) if isinstance(class_path, str) else None
        if cls is None:
            if not str(class_path).startswith("lightning.pytorch.callbacks."):
                log.warning("plan: skipped trainer.callbacks[%d] %s: plan instantiates only lightning_automodel.callbacks.", i, class_path)
            continue
        init_args = spec.get("init_args") if isinstance(spec, Mapping) else None
        try:
            callback = _instantiate(cls, init_args or {})
        except (TypeError, ValueError, MisconfigurationException, ArgumentError) as exc:
            raise PlanError(f"trainer.callbacks[{i}] {class_path}: {' '.join(str(exc).split())}") from None
        if isinstance(callback, ModelSurgeryCallback):
            out.append(callback)
    return sorted(out, key=lambda cb: cb.surgery_order)


# ---- the plan -------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What ``plan`` found; ``fsdp2`` and ``fsdp2_offload`` are set when the run shards with FSDP2."""

    counts: ParameterCounts
    frozen_by: dict[str, str] = field(default_factory=dict)
    memory: TrainingMemoryEstimate | None = None
    model: nn.Module | None = None
    fsdp2: FSDP2MemoryEstimate | None = None
    fsdp2_offload: FSDP2MemoryEstimate | None = None
    adapters: int = 0  # LoRA adapter elements (0 without the LoRA callback)
    compute_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    cpu_offload: bool = False
    nodes: int = 1  # trainer.num_nodes: the ranks are spread evenly over them
    node_host_bytes: int = 10**12  # --node_host_memory
    summary: ParameterSummary | None = None  # the config's summary: its name and depth shape the table


def world_size_from(trainer_config: Mapping[str, Any], note: bool = True) -> int:
    """devices x num_nodes; ``devices: auto`` (the parser's default) or ``-1`` cannot be known here: 1, with a
    note when the plan depends on it (``note``: sharded state; a replica's bytes do not depend on it)."""
    devices = trainer_config.get("devices", 1)
    if isinstance(devices, bool):
        devices = 1
    elif isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    elif isinstance(devices, str) and "," in devices:
        devices = [d for d in devices.split(",") if d.strip()]
    if isinstance(devices, list):
        devices = len(devices)
    if not isinstance(devices, int) or devices < 1:
        if note:
            log.warning("plan: trainer.devices is %r, which depends on the machine; planning 1 device per node (pass --world_size N).", devices)
        devices = 1
    return devices * int(trainer_config.get("num_nodes", 1) or 1)


def _strategy(trainer_config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    strategy = trainer_config.get("strategy")
    if isinstance(strategy, Mapping):
        return str(strategy.get("class_path", "")), dict(strategy.get("init_args") or {})
    return (strategy if isinstance(strategy, str) else ""), {}


def data_parallel_size(trainer_config: Mapping[str, Any]) -> int:
    """The ranks FSDP2 shards over: the strategy's ``data_parallel_size`` when it is a number, else every rank.

    A data x tensor size that does not multiply to devices x num_nodes fails here, as it would at the
    start of ``fit`` (``ModelParallelStrategy`` checks it), instead of after the job was queued.
    """
    total = world_size_from(trainer_config)
    name, init_args = _strategy(trainer_config)
    dp, tp = init_args.get("data_parallel_size", "auto"), init_args.get("tensor_parallel_size", "auto")
    if "ModelParallel" in name and not (isinstance(dp, int) and isinstance(tp, int)) and total > 1:
        # Lightning's 'auto' is tensor_parallel_size = devices per node, which HFCausalLM rejects at start-up.
        log.warning(
            "plan: trainer.strategy leaves data_parallel_size or tensor_parallel_size on 'auto' (Lightning then does tensor "
            "parallelism over a node's devices, which HFCausalLM rejects); set data_parallel_size: %d and "
            "tensor_parallel_size: 1. Planning FSDP2 over %d ranks.", total, total,
        )
    if isinstance(dp, int) and isinstance(tp, int):
        if dp * tp != total:
            raise PlanError(
                f"trainer.strategy has data_parallel_size={dp} x tensor_parallel_size={tp} = {dp * tp}, but devices x "
                f"num_nodes = {total}; make them agree (or pass --world_size N to plan N ranks regardless)."
            )
        return dp
    if isinstance(dp, int):
        return dp
    if isinstance(tp, int) and tp >= 1:
        return max(1, total // tp)
    return total


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_seq_length(model: nn.Module, data_config: Mapping[str, Any]) -> None:
    """``data.seq_length`` above the model's positions fails ``fit`` at setup; fail the plan the same way.

    The parsed config names the data module (``class_path``) and all its arguments (``init_args``);
    a bare ``data: {seq_length: ...}`` given to :func:`make_plan` is the default ``SFTDataModule``.
    """
    from lightning_automodel.data import SFTDataModule

    data_args = data_config.get("init_args") if "class_path" in data_config else data_config
    default = inspect.signature(SFTDataModule.__init__).parameters["seq_length"].default
    seq_length = (data_args or {}).get("seq_length", default)
    max_positions = int(getattr(_text_config(model.config), "max_position_embeddings", 0) or 0)
    if isinstance(seq_length, int) and max_positions and seq_length > max_positions:
        raise PlanError(
            f"seq_length={seq_length} is above the model's max_position_embeddings={max_positions}; lower data.seq_length."
        )


def _quantization_settings(settings: Any, sharded: bool) -> Any:
    """The job's ``BitsAndBytesConfig`` for ``model.quantization``, refused in one line where the job refuses it."""
    from lightning_automodel.models.hf_causal_lm import quantization_config

    try:
        config = quantization_config(settings)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    if sharded:
        raise PlanError("quantization (QLoRA) cannot run under FSDP2: fully_shard cannot shard bitsandbytes 4-bit weights; plan it with DDP.")
    return config


def _quantized_memory(model: nn.Module, memory: TrainingMemoryEstimate, config: Any) -> TrainingMemoryEstimate:
    """QLoRA: the linear weights bitsandbytes quantizes (every ``nn.Linear`` but the output head) at their 4-bit size.

    Counts stay logical (the meta model is not quantized); only the resident bytes change.
    """
    from lightning_automodel.core.memory import four_bit_weight_bytes

    if not config.load_in_4bit:
        return memory
    saved = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and not name.endswith("lm_head") and weight is not None:
            n = weight.numel()
            saved += n * weight.element_size() - four_bit_weight_bytes(
                n, blocksize=64, double_quant=bool(config.bnb_4bit_use_double_quant))
    return dataclasses.replace(memory, param_bytes=memory.param_bytes - saved)


def make_plan(config: Mapping[str, Any], *, world_size: int | None = None, optimizer_state_dtype: str | None = None) -> Plan:
    """Build the configured model on meta, apply the configured surgery, estimate per-rank memory.

    ``config`` is a ``fit`` config as :func:`parse_args` returns it; ``world_size`` ``None`` reads the trainer
    and strategy; ``optimizer_state_dtype`` ``None`` follows each parameter's dtype (AdamW's ``zeros_like``).
    """
    if world_size is not None and world_size < 1:
        raise PlanError(f"world_size must be >= 1; got {world_size}.")
    model_args = config.get("model") or {}
    trainer_config = config.get("trainer") or {}
    mixed = str(model_args.get("mixed_precision", "none"))
    weights_dtype = dtype_from_name(str(model_args.get("weights_dtype", "float32")))
    callbacks = surgery_callbacks(trainer_config)  # before the build: a bad callback fails fast
    model = build_meta(model_args)
    check_seq_length(model, config.get("data") or {})
    # The job's weights cast (no checkpoint here, so no fp32-stored tensor to keep; on meta it is free).
    weights_cast = functools.partial(building.apply_weights_dtype, dtype=weights_dtype) if weights_dtype != torch.float32 else None
    frozen_by: dict[str, str] = {}
    for step in surgery_schedule(callbacks, weights_cast):  # the order fit uses: one function decides it
        frozen_by.update(_apply_on_meta(step, model))
    if str(trainer_config.get("precision", "")).startswith("bf16-true"):
        cast_floating_point(model, torch.bfloat16)  # Lightning converts the module to bf16
    strategy_name, strategy_args = _strategy(trainer_config)
    tp = strategy_args.get("tensor_parallel_size")
    if "ModelParallel" in strategy_name and isinstance(tp, int) and tp > 1:
        raise PlanError(building.tensor_parallel_refusal(tp))
    sharded = world_size is not None or "ModelParallel" in strategy_name or "fsdp" in strategy_name.lower()
    size = world_size if world_size is not None else (data_parallel_size(trainer_config) if sharded else world_size_from(trainer_config, note=False))
    state_dtype = dtype_from_name(optimizer_state_dtype) if optimizer_state_dtype else None
    plan = _estimate(model, model_args, callbacks, frozen_by, sharded=sharded, size=size, mixed=mixed, state_dtype=state_dtype)
    plan.nodes = max(1, int(trainer_config.get("num_nodes", 1) or 1))
    plan.summary = next((cb for cb in callbacks if isinstance(cb, ParameterSummary)), None)
    return plan


def _apply_on_meta(step: SurgeryStep, model: nn.Module) -> Mapping[str, str]:
    """One surgery step's core action on the meta model, without a Trainer; returns what it froze -> rule."""
    if isinstance(step, WeightsDtypeCast):
        step.apply_to_model(model)
    elif isinstance(step, LoRA):
        try:
            return step.inject(model)  # adapters on the meta model, base frozen, as in fit
        except LoraConfigError as exc:
            raise PlanError(str(exc)) from None
    elif isinstance(step, ParameterFreezing):
        try:
            return step.freeze(model)
        except MisconfigurationException as exc:
            raise PlanError(str(exc)) from None
    elif isinstance(step, FreezeDeadParameters):
        return freeze_dead_parameters(model)
    elif isinstance(step, CastMixedDtypeToBF16):
        cast_floating_point(model, torch.bfloat16, cast_buffers=step.cast_buffers)
    elif isinstance(step, TiedLMHead):
        ensure_tied_lm_head(model)
    return {}


def _estimate(
    model: nn.Module, model_args: Mapping[str, Any], callbacks: Sequence[ModelSurgeryCallback], frozen_by: dict[str, str],
    *, sharded: bool, size: int, mixed: str, state_dtype: torch.dtype | None,
) -> Plan:
    quantization = model_args.get("quantization")
    bnb_config = _quantization_settings(quantization, sharded) if quantization is not None else None
    fsdp2 = None
    if sharded:
        compute = torch.bfloat16 if mixed == "bf16" else None
        reduce = torch.float32 if mixed == "bf16" else None  # the job's MixedPrecisionPolicy reduces in fp32
        groups = fsdp2_groups(model)
        common = dict(world_size=size, groups=groups, compute_dtype=compute, reduce_dtype=reduce, optimizer_state_dtype=state_dtype)
        fsdp2 = estimate_fsdp2_peak(model, cpu_offload=False, **common)
        # The sharded state is estimate_training_memory's by construction: no second pass over the model.
        memory = TrainingMemoryEstimate(size, fsdp2.param_bytes, fsdp2.grad_bytes, fsdp2.optimizer_bytes)
    else:
        memory = estimate_training_memory(model, world_size=size, optimizer_state_dtype=state_dtype, sharded=False)
        if bnb_config is not None:
            memory = _quantized_memory(model, memory, bnb_config)
    plan = Plan(count_parameters(model), frozen_by, memory, model)
    if any(isinstance(callback, LoRA) for callback in callbacks):
        plan.adapters = adapter_parameter_count(model)
    if fsdp2 is not None:
        plan.fsdp2 = fsdp2
        # Offload moves the same bytes to the host: only the derived device/host split differs.
        plan.fsdp2_offload = dataclasses.replace(fsdp2, cpu_offload=True)
        plan.compute_dtype, plan.reduce_dtype = compute, reduce
        plan.cpu_offload = bool(model_args.get("cpu_offload", False))
    return plan


_SHORT_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _dtype_label(dtypes: Sequence[torch.dtype]) -> str:
    return "+".join(sorted({_SHORT_DTYPE.get(d, str(d).removeprefix("torch.")) for d in dtypes})) or "-"


def format_fsdp2(plan: Plan) -> list[str]:
    """The FSDP2 memory lines: the layout's per-rank peak, then device and host with and without offload."""
    est, off = plan.fsdp2, plan.fsdp2_offload
    b = format_bytes_human
    weights = _dtype_label([p.dtype for _, p in unique_named_parameters(plan.model) if p.is_floating_point()])
    compute = _SHORT_DTYPE.get(plan.compute_dtype, weights) if plan.compute_dtype is not None else weights
    reduce = _SHORT_DTYPE.get(plan.reduce_dtype, compute) if plan.reduce_dtype is not None else compute
    kept = f" + kept unsharded [{', '.join(est.kept_groups)}]" if est.kept_groups else ""
    reduced = f" of {est.reduced_group}" if est.reduced_group else ""
    # Forward's gather peak and backward's reduce peak are added: an upper bound, not a simulation.
    return [
        f"Per rank at world size {est.world_size} (FSDP2, {weights} weights, {compute} compute, {reduce} gradient reduction):",
        f"  sharded state {b(est.sharded_bytes)} (params {b(est.param_bytes)}, grads {b(est.grad_bytes)}, AdamW {b(est.optimizer_bytes)})",
        f"  unsharded in flight {b(est.in_flight_bytes)} (params {b(est.gather_bytes)}: two largest groups "
        f"[{', '.join(est.prefetched_groups) or '-'}]{kept}; grads{reduced} being reduced {b(est.reduce_bytes)})",
        f"  total {b(est.total_bytes)}: without cpu_offload all on the device; with cpu_offload device "
        f"{b(off.device_bytes)}, host {b(off.host_bytes)} (this config: cpu_offload {'true' if plan.cpu_offload else 'false'}). "
        "Activations not included.",
        *format_per_node(plan),
    ]


def format_per_node(plan: Plan) -> list[str]:
    """Host memory per node with ``cpu_offload`` (FSDP2 pins the offloaded state), and what makes it fit a node.

    The ranks are spread evenly over ``trainer.num_nodes``. Pinned memory cannot be swapped or
    shared, so the node's host memory must hold every rank's offloaded state (plus the OS, the data
    loaders and the page cache: a node that only just fits does not).
    """
    off = plan.fsdp2_offload
    if off is None:
        return []
    b = format_bytes_human
    ranks = -(-off.world_size // plan.nodes)
    pinned = off.host_bytes * ranks
    head = (f"Per node ({ranks} rank{'s' if ranks != 1 else ''} on each of {plan.nodes} node{'s' if plan.nodes != 1 else ''}) "
            f"with cpu_offload: host {b(pinned)} pinned of {b(plan.node_host_bytes)} (--node_host_memory)")
    if pinned <= plan.node_host_bytes:
        return [head + ": fits."]
    # The sharded state scales with 1 / ranks: more nodes of the same size divide it.
    nodes = -(-pinned * plan.nodes // plan.node_host_bytes)
    fixes = [f"--trainer.num_nodes {nodes} (about {b(pinned * plan.nodes / nodes)} per node)"]
    if any(p.dtype == torch.float32 for _, p in unique_named_parameters(plan.model) if p.is_floating_point()):
        fixes.append(f"--model.weights_dtype bfloat16 (bf16 parameters, gradients and AdamW state: about {b(pinned / 2)})")
    if not plan.adapters:
        fixes.append(f"LoRA (the LoRA callback: gradients and AdamW state for the adapters only, about {b(off.param_bytes * ranks)})")
    return [head + ": does NOT fit.", "  Fits with: " + "; or ".join(fixes) + "."]


def format_plan(plan: Plan) -> str:
    counts, memory = plan.counts, plan.memory
    rows = module_breakdown(plan.model, depth=plan.summary.depth if plan.summary else 2, frozen_by=plan.frozen_by)
    table = render_table(
        ["Module", "Params", "Trainable", "Frozen by"],
        [[r.name, f"{r.total:,}", f"{r.trainable:,}", ", ".join(f"{k} ({v:,})" for k, v in sorted(r.frozen_by.items())) or "-"] for r in rows],
    )
    rules = Counter(plan.frozen_by.values())
    pct = 100.0 * counts.trainable / counts.total if counts.total else 0.0
    lines = [
        *([f"{plan.summary.name} plan (ParameterSummary, depth {plan.summary.depth}):"] if plan.summary else []),
        table,
        f"Trainable parameters: {counts.trainable:,} of {counts.total:,} ({pct:.2f}%)",
        *([f"LoRA adapter parameters: {plan.adapters:,}"] if plan.adapters else []),
        "Frozen groups: " + (", ".join(f"{rule}: {n} tensors" for rule, n in sorted(rules.items())) or "none"),
    ]
    if plan.fsdp2 is not None and plan.fsdp2_offload is not None:
        lines += format_fsdp2(plan)
    elif memory is not None:
        lines.append(
            f"Per rank at world size {memory.world_size}: params {format_bytes_human(memory.param_bytes)}, "
            f"grads {format_bytes_human(memory.grad_bytes)}, optimizer state {format_bytes_human(memory.optimizer_bytes)}, "
            f"total {format_bytes_human(memory.total_bytes)} (activations not included)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """Run ``plan``; bad input is one line on stderr and exit code 2, never a traceback."""
    if {"-h", "--help"} & set(argv):
        print(f"usage: {PROG} [--config CONFIG.yaml ...] [fit's options] [--world_size N] [--node_host_memory SIZE] "
              f"[--optimizer_state_dtype DTYPE]\n\n{__doc__}\nfit's options: lightning-automodel fit --help.")
        return 0
    try:
        with import_path_policy_preserved():  # the config's import allow-list ends with the command
            options, config = parse_args(argv)
            plan = make_plan(config, world_size=options.world_size, optimizer_state_dtype=options.optimizer_state_dtype)
        plan.node_host_bytes = options.node_host_memory
        report = format_plan(plan)
    except SystemExit as exc:  # --print_config
        return int(exc.code or 0)
    except (ValueError, OSError, MisconfigurationException) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    print(report)
    return 0
