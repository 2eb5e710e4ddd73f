"""Building Hugging Face models offline, the FSDP2 way (meta, shard, materialize, fill): no rank holds it all."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lightning_automodel.core.hf_weight_files import OfflineCheckpointError, read_bounded_json, resolve_checkpoint_files
from lightning_automodel.core.discovery import text_decoder_layers_path
from lightning_automodel.core.distributed import local_tensor
from lightning_automodel.core.fsdp_layout import ShardingUnit, fsdp2_units
from lightning_automodel.core.hub_layout import ExportError, HubModelInfo
from lightning_automodel.core.init import mark_unset, recompute_buffers
from lightning_automodel.core.naming import get_module_by_canonical_name, unique_named_parameters
from lightning_automodel.core.tied_head import ensure_tied_lm_head

log = logging.getLogger(__name__)

ModelClass = Literal["auto", "causal_lm", "image_text_to_text"]

# Set on a model whose FSDP2 shards live in host memory: a strategy must not move it to the device.
CPU_OFFLOAD_ATTR = "lightning_automodel_cpu_offload"


def check_local_model_dir(path: str | os.PathLike[str]) -> Path:
    """A local Hugging Face directory with a config and weights, or a clear error (we never download)."""
    root = Path(path)
    if not root.exists():
        hint = ""
        if "/" in str(path) and not str(path).startswith((".", "/", "~")):  # looks like a hub name
            hint = " It looks like a hub name: lightning-automodel runs offline, so download it once (`hf download NAME --local-dir DIR`) and pass DIR."
        raise OfflineCheckpointError(f"Model directory {str(path)!r} does not exist.{hint}")
    if not root.is_dir():
        raise NotADirectoryError(f"pretrained_path {str(path)!r} is a file; pass the model's directory.")
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root} has no config.json: it is not a Hugging Face model directory, or it is half-written.")
    check_config_json(root / "config.json")
    resolve_checkpoint_files(root)  # raises for missing or incomplete weights
    return root


#: Bytes a config.json may have; real ones are a few kilobytes (a VLM's, with its processor, under 100 KB).
MAX_CONFIG_JSON_BYTES = 10 * 2**20


def check_config_json(path: Path) -> None:
    """A JSON object of bounded size and depth (transformers' ``json.loads`` recurses on ``[[[...]]]``), or one line."""
    value = read_bounded_json(path, "model config", MAX_CONFIG_JSON_BYTES)
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object (the model config); found {type(value).__name__}.")
    try:
        validate_model_config(value)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


#: Size fields that must be positive integers wherever a (sub-)config has them.
_POSITIVE_SIZES = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "moe_intermediate_size", "num_local_experts",
    "num_experts", "num_experts_per_tok", "patch_size", "image_size", "num_channels",
)
#: Decoder layers a config may ask for: 10^6 layers build for minutes into a MemoryError, even on meta.
MAX_LAYERS = 100_000
#: Parameters a config may ask for (10^13: five times today's largest models).
MAX_PARAMETERS = 10**13


def validate_model_config(config: PretrainedConfig | Mapping[str, Any]) -> None:
    """Refuse in one line a config (or mapping) that cannot make a working model (``num_hidden_layers: -1``)."""
    for where, sub in _sub_configs(config):
        for field_name in _POSITIVE_SIZES:
            value = _field(sub, field_name)
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if item is None:
                    continue
                if isinstance(item, bool) or not isinstance(item, int) or item <= 0:
                    raise ValueError(f"model config {where}{field_name} must be a positive integer; got {item!r}.")
        _check_heads(sub, where)
        layers = _field(sub, "num_hidden_layers")
        if isinstance(layers, int) and layers > MAX_LAYERS:
            raise ValueError(f"model config {where}num_hidden_layers={layers:,} is above {MAX_LAYERS:,}; no model that deep can be trained.")
        params = estimate_parameters(sub)
        if params > MAX_PARAMETERS:
            raise ValueError(
                f"model config {where or 'sizes'}: about {params:.1e} parameters (vocab_size, hidden_size, intermediate_size, "
                f"num_hidden_layers) is above {MAX_PARAMETERS:.0e}; check the sizes."
            )


def _field(config: PretrainedConfig | Mapping[str, Any], name: str) -> Any:
    return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)


def _sub_configs(config: PretrainedConfig | Mapping[str, Any]) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = [("", config)]
    if isinstance(config, Mapping):
        keys = [k for k, v in config.items() if isinstance(v, Mapping) and k.endswith("_config") and k != "quantization_config"]
    else:
        keys = list(getattr(config, "sub_configs", {}) or {})
    for key in keys:
        sub = _field(config, key)
        if isinstance(sub, (PretrainedConfig, Mapping)) and sub is not config:
            found.append((f"{key}.", sub))
    return found


def _check_heads(sub: Any, where: str) -> None:
    hidden, heads, kv_heads = (_field(sub, name) for name in ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    if isinstance(hidden, int) and isinstance(heads, int) and _field(sub, "head_dim") is None and hidden % heads:
        raise ValueError(
            f"model config {where}hidden_size={hidden} is not divisible by num_attention_heads={heads}; "
            "pick sizes that divide, or set head_dim."
        )
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise ValueError(f"model config {where}num_attention_heads={heads} is not divisible by num_key_value_heads={kv_heads}.")


def estimate_parameters(sub: Any) -> int:
    """A rough parameter count from the sizes (embeddings, attention, MLP); 0 when they are not all there."""
    sizes = [_field(sub, name) for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")]
    if not all(isinstance(v, int) for v in sizes):
        return 0
    vocab, hidden, inter, layers = sizes
    experts = max(_field(sub, "num_local_experts") or 0, _field(sub, "num_experts") or 0, 1)
    return 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter * experts)


def inline_config(config: Mapping[str, Any]) -> PretrainedConfig:
    """``{"model_type": "llama", "hidden_size": 64, ...}`` -> a config; unknown keys are an error."""
    values = dict(config)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise ValueError("The inline model config needs a `model_type` (e.g. llama, qwen3, gemma3_text).")
    try:
        default = AutoConfig.for_model(model_type)
    except ValueError as exc:
        raise ValueError(f"Unknown model_type {model_type!r} in the inline model config: {exc}") from None
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {})) | set(vars(default))
    nested = {"text_config", "vision_config", "audio_config"}
    unknown = sorted(k for k in values if k not in known and k not in nested)
    if unknown:
        hints = {k: difflib.get_close_matches(k, sorted(known), n=1) for k in unknown}
        detail = ", ".join(f"{k!r}" + (f" (did you mean {v[0]!r}?)" if v else "") for k, v in hints.items())
        raise ValueError(f"The inline {model_type} config has unknown key(s): {detail}.")
    validate_model_config(values)  # transformers' constructors divide by head counts
    return AutoConfig.for_model(model_type, **values)


def model_class_for(config: PretrainedConfig, model_class: ModelClass = "auto"):
    if model_class == "causal_lm":
        return AutoModelForCausalLM
    if model_class == "image_text_to_text" or (model_class == "auto" and getattr(config, "vision_config", None) is not None):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def build_meta_model(
    config: PretrainedConfig, model_class: ModelClass = "auto", *, dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The whole model on meta, as ``from_pretrained``; explicit ``dtype``: a hub config's bf16 rounds AdamW away."""
    from transformers.initialization import meta_device_safe_creation_ops, no_init_weights

    validate_model_config(config)
    cls = model_class_for(config, model_class)
    # As ``from_pretrained``: ``no_init_weights`` skips half of a deep meta build's time; the other keeps
    # ``torch.linspace`` on the CPU, so remote code that calls ``.item()`` in ``__init__`` builds.
    with torch.device("meta"), no_init_weights(), meta_device_safe_creation_ops():
        model = cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # tied embeddings are one tensor, as in the job
    return model


def tensor_parallel_refusal(tensor_parallel_size: int) -> str:
    """Why ``tensor_parallel_size > 1`` is refused (one line, shared by ``fit`` and ``plan``)."""
    return (
        f"HFCausalLM does not do tensor parallelism yet (tensor_parallel_size={tensor_parallel_size}): ranks would "
        "hold full copies and see identical batches. Set tensor_parallel_size: 1 and data_parallel_size to the "
        "number of devices; FSDP2 shards across all of them."
    )


def _minority_dtype_modules(modules: tuple[nn.Module, ...]) -> list[nn.Module]:
    """Submodules whose trainable dtype differs from their unit's (fp32 gates): FSDP2 needs one dtype per group."""
    counts: dict[torch.dtype, int] = {}
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    if len(counts) <= 1:
        return []
    majority = max(counts, key=counts.__getitem__)
    out = []
    for module in modules:
        for sub in module.modules():
            direct = [p for p in sub.parameters(recurse=False) if p.requires_grad]
            if direct and any(p.dtype != majority for p in direct):
                if any(p.dtype == majority for p in direct):
                    raise ValueError(
                        f"{type(sub).__name__} holds trainable parameters of two dtypes; FSDP2 cannot shard it. "
                        "Use weights_dtype: float32, or cast it with CastMixedDtypeToBF16."
                    )
                out.append(sub)
    return out


def apply_fsdp2(
    model: PreTrainedModel, mesh: Any, *, mixed_precision: bool = False, activation_checkpointing: bool = False,
    cpu_offload: bool = False,
) -> list[ShardingUnit]:
    """Shard ``model`` in the ``core.fsdp_layout`` layout; returns the units. ``mixed_precision``: gather and compute
    in bf16, reduce in fp32. ``cpu_offload``: sharded state in host memory, each unit copied to the device to run."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    # Pinned host memory needs a CUDA driver; without one, offload still works, unpinned.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    units = fsdp2_units(model)
    if activation_checkpointing:
        from lightning_automodel._compat.torch import checkpoint_wrapper as wrapper_class

        checkpoint_wrapper = wrapper_class()
        layers = get_module_by_canonical_name(model, text_decoder_layers_path(model))  # fsdp2_units found it
        wrapped = {}
        for i, layer in enumerate(layers):
            layers[i] = wrapped[id(layer)] = checkpoint_wrapper(layer)
        # Shard the wrapper, as torchtitan does: the recompute in backward runs inside the FSDP unit.
        units = [ShardingUnit(u.name, tuple(wrapped.get(id(m), m) for m in u.modules), u.reshard_after_forward) for u in units]
    for unit in units:
        minority = _minority_dtype_modules(unit.modules)
        for sub in minority:
            fully_shard(sub, mesh=mesh, mp_policy=policy, offload_policy=offload)
        rest = [m for m in unit.modules if not any(m is sub for sub in minority)]
        if rest:
            modules = rest[0] if len(rest) == 1 else rest
            fully_shard(modules, mesh=mesh, mp_policy=policy, offload_policy=offload, reshard_after_forward=unit.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
    setattr(model, CPU_OFFLOAD_ATTR, cpu_offload)
    return units


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a meta model's shards on ``device`` (undefined until a load or init) and compute its buffers."""
    check_fits_on_device(model, device)
    places: dict[int, list[tuple[nn.Module, str]]] = {}  # each buffer's (module, name) places
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False, remove_duplicate=False):
            if buffer is not None:
                places.setdefault(id(buffer), []).append((module, name))
    model.to_empty(device=device)
    for (first_module, first_name), *others in places.values():  # ``to_empty`` gave each place its own copy
        for module, name in others:
            setattr(module, name, getattr(first_module, first_name))  # an existing buffer slot: stays a buffer
    fill_uninitialized(model)
    recompute_buffers(model)
    ensure_tied_lm_head(model)


def check_fits_on_device(model: nn.Module, device: torch.device) -> None:
    """ValueError when this rank's parameters and buffers (local shards) exceed ``device``'s total memory."""
    device = torch.device(device)
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory
    elif device.type == "cpu" and hasattr(os, "sysconf"):
        capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return
    tensors = [*model.named_parameters(), *model.named_buffers()]
    sizes = {name: local_tensor(t).numel() * t.element_size() for name, t in tensors}
    needed = sum(sizes.values())
    if needed > capacity:
        largest = max(sizes, key=sizes.__getitem__)
        shape = tuple(dict(tensors)[largest].shape)
        raise ValueError(
            f"this rank's share of the model is {needed / 2**30:,.1f} GiB, more than the {capacity / 2**30:,.1f} GiB of memory "
            f"of {device}; the largest tensor is {largest} {list(shape)} ({sizes[largest] / 2**30:,.1f} GiB): check the "
            "sizes in the model config (vocab_size, hidden_size, ...) or shard over more devices."
        )


FILL_UNINITIALIZED_ENV = "LIGHTNING_AUTOMODEL_FILL_UNINITIALIZED"


@torch.no_grad()
def fill_uninitialized(model: nn.Module) -> None:
    """Test switch: ``LIGHTNING_AUTOMODEL_FILL_UNINITIALIZED=nan`` marks fresh parameters NaN (zeros hide a miss)."""
    value = os.environ.get(FILL_UNINITIALIZED_ENV, "").strip().lower()
    if value and value != "nan":
        raise ValueError(f"{FILL_UNINITIALIZED_ENV}={value!r}: the only supported value is 'nan' (or unset).")
    for tensor in model.parameters() if value else []:
        if tensor.is_floating_point() or tensor.is_complex():
            mark_unset(tensor)


def apply_weights_dtype(model: nn.Module, dtype: torch.dtype, keep_fp32: set[str] = frozenset()) -> list[str]:
    """Store float parameters in ``dtype`` in place (ties survive), except ``keep_fp32`` (router gates) and LoRA."""
    from lightning_automodel.core.naming import base_checkpoint_name, is_adapter_name

    changed = []
    for name, param in unique_named_parameters(model):
        if is_adapter_name(name) or {name, base_checkpoint_name(name)} & keep_fp32:
            continue  # LoRA adapters train in fp32 on low-precision base weights
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            changed.append(name)
    return changed


def build_meta_model_for(info: HubModelInfo, src: Path) -> Any:
    """The Hugging Face model described by ``info``, on meta (transformers' classes only: no remote code)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = info.config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ExportError(f"{src}: model type {model_type!r} is not one transformers knows; export does not run remote code.")
    cls = getattr(transformers, info.model_class, None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ExportError(f"{src}: {info.model_class!r} is not a transformers model class; export does not run remote code.")
    config = CONFIG_MAPPING[model_type].from_dict(dict(info.config))
    for kind in ("causal_lm", "image_text_to_text"):
        try:
            model = build_meta_model(config, kind)
        except ValueError:
            continue
        if type(model) is cls:
            return model
    raise ExportError(f"{src}: cannot rebuild {info.model_class} from its config with transformers' auto classes.")
