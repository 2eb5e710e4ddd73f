"""``lightning-automodel plan``: what a config will train and what it costs per rank, without a weight.

The model is built on the meta device from its config alone (a directory holding only ``config.json`` is
enough), the configured surgery callbacks apply their core actions to it in the order ``fit`` applies them,
and the result is printed: each module with what froze it, totals, and the per-rank memory of the job's
FSDP2 layout with and without CPU offload. No Trainer is created, so an 8-GPU config plans on a laptop.

The command line is ``fit``'s, parsed by ``fit``'s own parser, plus ``--world_size``, ``--node_host_memory``
and ``--optimizer_state_dtype``. A config is data: only callbacks from ``lightning_automodel.callbacks`` are
instantiated, and only class paths on the configuration import allow-list are ever imported (by the parser).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from argparse import ArgumentError
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
from lightning_automodel.cli import AutoModelCLI, check_command_line, fail_in_one_line, job_cli
from lightning_automodel.config_loading import PlanError
from lightning_automodel.core.dead_params import freeze_dead_parameters
from lightning_automodel.core.dtypes import cast_floating_point, dtype_from_name
from lightning_automodel.core.fsdp_layout import fsdp2_groups
from lightning_automodel.core.hf_weight_files import format_bytes_human
from lightning_automodel.core.hub_writer import parse_size
from lightning_automodel.core.lora import LoraConfigError, adapter_parameter_count
from lightning_automodel.core.memory import TrainingMemoryEstimate, estimate_fsdp2_peak, estimate_training_memory, four_bit_weight_bytes
from lightning_automodel.core.model_build import build_meta_model, tensor_parallel_refusal
from lightning_automodel.core.naming import unique_named_parameters
from lightning_automodel.core.parameters import ParameterCounts, count_parameters, module_breakdown
from lightning_automodel.core.tied_head import ensure_tied_lm_head
from lightning_automodel.models.hf_causal_lm import HFCausalLM, quantization_config

log = logging.getLogger(__name__)

PROG = "lightning-automodel plan"
#: from this depth on, plan says that it is building (a progress line: every layer is constructed, as in fit)
_MANY_LAYERS = 2000


@dataclass(frozen=True)
class PlanOptions:
    world_size: int | None = None
    node_host_memory: int = 10**12
    optimizer_state_dtype: str | None = None


class _Parsed(Exception):
    """Ends a :class:`_PlanCLI` right after parsing; its one argument is the ``fit`` section of the config."""


class _PlanCLI(AutoModelCLI):
    """``fit``'s parser plus plan's options; stops right after parsing (nothing instantiated or seeded)."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": AutoModelCLI.subcommands()["fit"]}  # the other subcommands' parsers would be built for nothing

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--world_size", type=int | None, default=None,
                            help="data-parallel ranks to shard over (default: the strategy's data_parallel_size, else devices x num_nodes)")
        parser.add_argument("--node_host_memory", type=str, default="1TB",
                            help="host memory of one node, e.g. 1TB (default), 2TiB, 768GB: the per-node check of cpu_offload's pinned state")
        parser.add_argument("--optimizer_state_dtype", type=str | None, default=None,
                            help="dtype of the AdamW state (default: the parameter's dtype, which is what AdamW allocates)")

    def check_ckpt_path_config(self) -> None:
        raise _Parsed(self.config["fit"])


def parse_args(argv: Sequence[str]) -> tuple[PlanOptions, dict[str, Any]]:
    """``plan``'s options and the config as ``fit``'s parser reads ``argv``, as data: nothing instantiated."""
    check_command_line(list(argv))  # restricts import paths for the rest of the command (main puts the policy back)
    with warnings.catch_warnings():
        # LightningCLI warns when args is given while sys.argv has arguments: here argv *is* sys.argv minus "plan".
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            job_cli(_PlanCLI, args=["fit", *argv], save_config_callback=None)
            raise AssertionError("_PlanCLI always stops after parsing")
        except _Parsed as parsed:
            config = parsed.args[0].as_dict()
    world_size = config.pop("world_size", None)
    if world_size is not None and world_size < 1:
        raise PlanError(f"--world_size: must be >= 1 (the number of ranks to shard over); got {world_size}")
    try:
        node_memory = parse_size(config.pop("node_host_memory", "1TB"), "--node_host_memory")
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    return PlanOptions(world_size, node_memory, config.pop("optimizer_state_dtype", None)), config


def job_module(model_args: Mapping[str, Any]) -> HFCausalLM:
    """The job's LightningModule for ``model:`` (its checks and defaults), never built or loaded here."""
    try:
        return HFCausalLM(**model_args)
    except ValueError as exc:
        raise PlanError(str(exc)) from None


def build_meta(model_args: Mapping[str, Any] | HFCausalLM) -> nn.Module:
    """The model on meta in fp32, from its config alone (``weights_dtype`` is applied afterwards, as the job does)."""
    module = model_args if isinstance(model_args, HFCausalLM) else job_module(model_args)
    config = module.build_hf_config(weights=False)
    layers = getattr(_text_config(config), "num_hidden_layers", 0) or 0
    if layers >= _MANY_LAYERS:
        # Every layer is constructed as in `fit` (no storage: on meta): about 0.5 ms per layer here.
        log.warning("plan: building %d layers on the meta device (about %d s)...", layers, max(1, layers // 2000))
    return build_meta_model(config, module.hparams.model_class, trust_remote_code=module.hparams.trust_remote_code)


def _callback_class(class_path: str) -> type | None:
    """The package's callback class ``class_path`` names (short, package or module path); nothing is imported."""
    module, _, name = class_path.rpartition(".")
    cls = getattr(_callbacks_pkg, name) if name in _callbacks_pkg.__all__ else None
    accepted = ("", "lightning_automodel", _callbacks_pkg.__name__, getattr(cls, "__module__", None))
    return cls if isinstance(cls, type) and module in accepted else None


def _instantiate(cls: type, init_args: Mapping[str, Any]) -> Any:
    """``cls(**init_args)`` as fit's parser instantiates it (nested dataclasses such as LoRA's ``runtime_config`` too)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callback", type=cls)
    spec = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(init_args)}
    return parser.instantiate_classes(parser.parse_object({"callback": spec})).callback


def surgery_callbacks(trainer_config: Mapping[str, Any]) -> list[ModelSurgeryCallback]:
    """The configured surgery callbacks in ``surgery_order``; only the package's callbacks are ever instantiated."""
    specs = trainer_config.get("callbacks") or []
    out: list[ModelSurgeryCallback] = []
    for i, spec in enumerate([specs] if isinstance(specs, Mapping) else specs):
        class_path = spec.get("class_path") if isinstance(spec, Mapping) else spec
        cls = _callback_class(class_path) if isinstance(class_path, str) else None
        if cls is None:
            if not str(class_path).startswith("lightning.pytorch.callbacks."):
                log.warning("plan: skipped trainer.callbacks[%d] %s: plan instantiates only lightning_automodel.callbacks.", i, class_path)
            continue
        try:
            callback = _instantiate(cls, (spec.get("init_args") if isinstance(spec, Mapping) else None) or {})
        except (TypeError, ValueError, MisconfigurationException, ArgumentError) as exc:
            raise PlanError(f"trainer.callbacks[{i}] {class_path}: {' '.join(str(exc).split())}") from None
        if isinstance(callback, ModelSurgeryCallback):
            out.append(callback)
    return sorted(out, key=lambda cb: cb.surgery_order)


def _apply_on_meta(step: SurgeryStep, model: nn.Module) -> Mapping[str, str]:
    """One surgery step's core action on the meta model, without a Trainer; returns what it froze -> rule."""
    try:
        if isinstance(step, WeightsDtypeCast):
            step.apply_to_model(model)
        elif isinstance(step, LoRA):
            return step.inject(model)  # adapters on the meta model, base frozen, as in fit
        elif isinstance(step, ParameterFreezing):
            return step.freeze(model)
        elif isinstance(step, FreezeDeadParameters):
            return freeze_dead_parameters(model)
        elif isinstance(step, CastMixedDtypeToBF16):
            cast_floating_point(model, torch.bfloat16, cast_buffers=step.cast_buffers)
        elif isinstance(step, TiedLMHead):
            ensure_tied_lm_head(model)
    except (LoraConfigError, MisconfigurationException) as exc:
        raise PlanError(str(exc)) from None
    return {}


@dataclass
class Plan:
    """What ``plan`` found; ``fsdp2`` and ``fsdp2_offload`` are set when the run shards with FSDP2."""

    counts: ParameterCounts
    frozen_by: dict[str, str] = field(default_factory=dict)
    memory: TrainingMemoryEstimate | None = None
    model: nn.Module | None = None
    fsdp2: Any = None  # FSDP2MemoryEstimate
    fsdp2_offload: Any = None  # the same bytes with cpu_offload: only the device/host split differs
    adapters: int = 0  # LoRA adapter elements (0 without the LoRA callback)
    mixed_bf16: bool = False  # model.mixed_precision: bf16 (FSDP2 computes in bf16, reduces in fp32)
    cpu_offload: bool = False
    nodes: int = 1  # trainer.num_nodes: the ranks are spread evenly over them
    node_host_bytes: int = 10**12  # --node_host_memory
    summary: ParameterSummary | None = None  # the config's summary: its name and depth shape the table


def world_size_from(trainer_config: Mapping[str, Any], note: bool = True) -> int:
    """devices x num_nodes; a machine-dependent ``devices`` (``auto``, ``-1``) counts 1, with a note if ``note``."""
    devices = trainer_config.get("devices", 1)
    if isinstance(devices, str) and "," in devices:
        devices = [d for d in devices.split(",") if d.strip()]
    elif isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    count = len(devices) if isinstance(devices, list) else 1 if isinstance(devices, bool) else devices
    if not isinstance(count, int) or count < 1:
        if note:
            log.warning("plan: trainer.devices is %r, which depends on the machine; planning 1 device per node (pass --world_size N).", devices)
        count = 1
    return count * int(trainer_config.get("num_nodes", 1) or 1)


def _strategy(trainer_config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    strategy = trainer_config.get("strategy")
    if isinstance(strategy, Mapping):
        return str(strategy.get("class_path", "")), dict(strategy.get("init_args") or {})
    return (strategy if isinstance(strategy, str) else ""), {}


def data_parallel_size(trainer_config: Mapping[str, Any]) -> int:
    """The ranks FSDP2 shards over: the strategy's ``data_parallel_size`` when it is a number, else every rank."""
    total = world_size_from(trainer_config)
    name, init_args = _strategy(trainer_config)
    dp, tp = init_args.get("data_parallel_size", "auto"), init_args.get("tensor_parallel_size", "auto")
    if isinstance(dp, int) and isinstance(tp, int):
        if dp * tp != total:
            raise PlanError(
                f"trainer.strategy has data_parallel_size={dp} x tensor_parallel_size={tp} = {dp * tp}, but devices x "
                f"num_nodes = {total}; make them agree (or pass --world_size N to plan N ranks regardless)."
            )
        return dp
    if "ModelParallel" in name and total > 1:
        # Lightning's 'auto' is tensor_parallel_size = devices per node, which HFCausalLM rejects at start-up.
        log.warning(
            "plan: trainer.strategy leaves data_parallel_size or tensor_parallel_size on 'auto' (Lightning then does tensor "
            "parallelism over a node's devices, which HFCausalLM rejects); set data_parallel_size: %d and "
            "tensor_parallel_size: 1. Planning FSDP2 over %d ranks.", total, total,
        )
    if isinstance(dp, int):
        return dp
    return max(1, total // tp) if isinstance(tp, int) and tp >= 1 else total


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_seq_length(model: nn.Module, data_config: Mapping[str, Any]) -> None:
    """``data.seq_length`` above the model's positions fails ``fit`` at setup; fail the plan the same way."""
    from lightning_automodel.data.sft_datamodule import resolve_defaults

    data_args = (data_config.get("init_args") if "class_path" in data_config else data_config) or {}
    seq_length = resolve_defaults(data_args.get("train_files"), data_args.get("seq_length"), None, None)[0]
    max_positions = int(getattr(_text_config(model.config), "max_position_embeddings", 0) or 0)
    if isinstance(seq_length, int) and max_positions and seq_length > max_positions:
        raise PlanError(
            f"seq_length={seq_length} is above the model's max_position_embeddings={max_positions}; lower data.seq_length."
        )


def _quantized_bytes_saved(model: nn.Module, settings: dict[str, Any]) -> int:
    """QLoRA: bytes saved by bitsandbytes' 4-bit weights (every ``nn.Linear`` but the head; counts stay logical)."""
    config = quantization_config(settings)
    if not config.load_in_4bit:
        return 0
    weights = [m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear) and not name.endswith("lm_head")]
    double_quant = bool(config.bnb_4bit_use_double_quant)
    return sum(w.numel() * w.element_size() - four_bit_weight_bytes(w.numel(), blocksize=64, double_quant=double_quant) for w in weights)


def make_plan(config: Mapping[str, Any], *, world_size: int | None = None, optimizer_state_dtype: str | None = None) -> Plan:
    """Build the model on meta, apply the surgery in fit's order, estimate per-rank memory (``None``: from config)."""
    if world_size is not None and world_size < 1:
        raise PlanError(f"world_size must be >= 1; got {world_size}.")
    trainer_config = config.get("trainer") or {}
    callbacks = surgery_callbacks(trainer_config)  # before the build: a bad callback fails fast
    module = job_module(config.get("model") or {})
    hp = module.hparams
    model = build_meta(module)
    check_seq_length(model, config.get("data") or {})
    frozen_by: dict[str, str] = {}
    for step in surgery_schedule(callbacks, module.weights_cast()):  # the order fit uses: one function decides it
        frozen_by.update(_apply_on_meta(step, model))
    if str(trainer_config.get("precision", "")).startswith("bf16-true"):
        cast_floating_point(model, torch.bfloat16)  # Lightning converts the module to bf16
    strategy_name, strategy_args = _strategy(trainer_config)
    tp = strategy_args.get("tensor_parallel_size")
    if "ModelParallel" in strategy_name and isinstance(tp, int) and tp > 1:
        raise PlanError(tensor_parallel_refusal(tp))
    sharded = world_size is not None or "ModelParallel" in strategy_name or "fsdp" in strategy_name.lower()
    state_dtype = dtype_from_name(optimizer_state_dtype) if optimizer_state_dtype else None
    plan = Plan(count_parameters(model), frozen_by, model=model, mixed_bf16=hp.mixed_precision == "bf16",
                nodes=max(1, int(trainer_config.get("num_nodes", 1) or 1)), cpu_offload=bool(hp.cpu_offload),
                summary=next((cb for cb in callbacks if isinstance(cb, ParameterSummary)), None))
    if any(isinstance(callback, LoRA) for callback in callbacks):
        plan.adapters = adapter_parameter_count(model)
    if sharded:
        if hp.quantization is not None:
            raise PlanError("quantization (QLoRA) cannot run under FSDP2: fully_shard cannot shard bitsandbytes 4-bit weights; plan it with DDP.")
        compute, reduce = (torch.bfloat16, torch.float32) if plan.mixed_bf16 else (None, None)
        plan.fsdp2 = estimate_fsdp2_peak(
            model, world_size=world_size or data_parallel_size(trainer_config), groups=fsdp2_groups(model),
            compute_dtype=compute, reduce_dtype=reduce, optimizer_state_dtype=state_dtype, cpu_offload=False,
        )
        plan.fsdp2_offload = dataclasses.replace(plan.fsdp2, cpu_offload=True)
        # The sharded state is estimate_training_memory's by construction: no second pass over the model.
        plan.memory = TrainingMemoryEstimate(plan.fsdp2.world_size, plan.fsdp2.param_bytes, plan.fsdp2.grad_bytes, plan.fsdp2.optimizer_bytes)
    else:
        plan.memory = estimate_training_memory(model, world_size=world_size_from(trainer_config, note=False),
                                               optimizer_state_dtype=state_dtype, sharded=False)
        if hp.quantization is not None:
            plan.memory = dataclasses.replace(plan.memory, param_bytes=plan.memory.param_bytes - _quantized_bytes_saved(model, hp.quantization))
    return plan


_SHORT_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def format_fsdp2(plan: Plan) -> list[str]:
    """The FSDP2 memory lines: the layout's per-rank peak, then device and host with and without offload."""
    est, off, b = plan.fsdp2, plan.fsdp2_offload, format_bytes_human
    dtypes = {p.dtype for _, p in unique_named_parameters(plan.model) if p.is_floating_point()}
    weights = "+".join(sorted(_SHORT_DTYPE.get(d, str(d).removeprefix("torch.")) for d in dtypes)) or "-"
    compute, reduce = ("bf16", "fp32") if plan.mixed_bf16 else (weights, weights)
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
    """Host memory per node with ``cpu_offload`` (pinned: a node must hold every rank's) and what makes it fit."""
    off, b = plan.fsdp2_offload, format_bytes_human
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
    counts, memory, b = plan.counts, plan.memory, format_bytes_human
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
    if plan.fsdp2 is not None:
        lines += format_fsdp2(plan)
    elif memory is not None:
        lines.append(
            f"Per rank at world size {memory.world_size}: params {b(memory.param_bytes)}, grads {b(memory.grad_bytes)}, "
            f"optimizer state {b(memory.optimizer_bytes)}, total {b(memory.total_bytes)} (activations not included)"
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
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is an input error
        return fail_in_one_line(PROG, exc)
    print(report)
    return 0
