"""LoRA adapters in place through peft's ``inject_adapter_in_model``: it keeps the model's names (no
``base_model.model.`` prefix), so un-adapted checkpoints still load. Adapters are initialized on a CPU twin
per layer seeded by (seed, name): the same numbers at every world size."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_automodel._compat.peft import create_adapter, layer_settings, layer_variant
from lightning_automodel._compat.torch import own_children, own_parameters, set_own_slots
from lightning_automodel.core.naming import ADAPTER_NAME, BASE_LAYER, base_checkpoint_name, canonical_name, is_adapter_name
from lightning_automodel.core.distributed import module_seed

BASE_RULE = "LoRA (base weights frozen)"


class LoraConfigError(ValueError):
    """A LoRA setting does not fit the model; the message names it and the fix."""


def lora_config(
    r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0, target_modules: str | list[str] = "all-linear",
    exclude_modules: str | list[str] | None = None, **extra: Any,
) -> Any:
    """A ``peft.LoraConfig``; any other ``LoraConfig`` field passes through ``extra``."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise LoraConfigError("LoRA needs peft: pip install 'lightning-automodel[peft]'.") from None
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise LoraConfigError(f"LoRA rank r must be a positive integer; got {r!r}.")
    # LightningCLI passes every LoraConfig field with its default; an empty loftq_config only makes peft warn.
    if not extra.get("loftq_config", True):
        extra.pop("loftq_config")
    init = extra.get("init_lora_weights", True)
    if init not in INIT_WITHOUT_BASE:
        raise LoraConfigError(
            f"init_lora_weights={init!r} needs the base weights at init (PiSSA, OLoRA, LoftQ...), which a meta-device "
            "build does not have; use true (peft's default), gaussian, orthogonal or false."
        )
    try:
        return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                          exclude_modules=exclude_modules, **extra)
    except (TypeError, ValueError) as exc:
        raise LoraConfigError(f"invalid LoRA configuration: {exc}") from None


def config_to_json(config: Any) -> str:
    """The ``LoraConfig`` as JSON (sets become sorted lists)."""
    data = config.to_dict()
    return json.dumps(data, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v), sort_keys=True)


def config_from_json(text: str) -> Any:
    from peft import LoraConfig

    data = json.loads(text)
    fields = set(LoraConfig.__dataclass_fields__)
    return LoraConfig(**{k: v for k, v in data.items() if k in fields and k not in ("peft_type", "task_type")})


def _linear_layers(model: nn.Module) -> str:
    """Up to 8 distinct last components of the model's ``nn.Linear`` modules (``q_proj``, ...), for messages."""
    names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)})
    return ", ".join(names[:8]) or "none"


def _check_targets(model: nn.Module, config: Any) -> None:
    targets = config.target_modules
    if isinstance(targets, str):
        return  # "all-linear" or a regex: peft reports a regex that matches nothing
    names = [name for name, _ in model.named_modules()]
    for target in sorted(targets):
        if not any(name == target or name.endswith(f".{target}") for name in names):
            raise LoraConfigError(
                f"LoRA target_modules entry {target!r} matches no module of the model; its linear layers are: {_linear_layers(model)}."
            )


def inject_lora(model: nn.Module, config: Any) -> list[str]:
    """Inject adapters in place and return the adapted module names; every target is checked first."""
    from peft import inject_adapter_in_model

    if any(is_adapter_name(name) for name, _ in model.named_parameters()):
        raise LoraConfigError("the model already has LoRA adapters; add the LoRA callback once.")
    _check_targets(model, config)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    except ValueError as exc:
        reason = " ".join(str(exc).split())
        raise LoraConfigError(f"LoRA could not be applied: {reason} (linear layers: {_linear_layers(model)}).") from None
    for warning in caught:
        if not _is_fused_expert_pattern_warning(warning, config):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return adapted_modules(model)


_PATTERN_WARNING = re.compile(r"The following (rank|alpha)_pattern keys did not match any targeted module and were ignored: \[(.*)\]")


def _is_fused_expert_pattern_warning(warning: warnings.WarningMessage, config: Any) -> bool:
    """peft's "rank_pattern keys did not match" about its own fused-expert patterns: for a MoE model peft
    adds ``.*\\.gate_up_proj`` for that *parameter* target, then warns (checking module names) it was ignored; it was not."""
    match = _PATTERN_WARNING.search(str(warning.message))
    if match is None or not issubclass(warning.category, RuntimeWarning):
        return False
    keys = [key.strip().strip("'\"") for key in match.group(2).split(",")]
    parameters = set(getattr(config, "target_parameters", None) or ())
    return bool(keys) and all(any(key.endswith(name) for name in parameters) for key in keys)


def adapted_modules(model: nn.Module) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def freeze_base(model: nn.Module, trainable_before: set[str] | None = None) -> dict[str, str]:
    """Freeze non-adapter parameters; name -> rule for those LoRA froze (peft already froze: ``trainable_before``)."""
    frozen = {}
    for name, param in model.named_parameters():
        if is_adapter_name(name):
            continue
        was_trainable = param.requires_grad if trainable_before is None else base_checkpoint_name(canonical_name(name)) in trainable_before
        param.requires_grad_(False)
        if was_trainable:
            frozen[canonical_name(name)] = BASE_RULE
    return frozen


def trainable_names(model: nn.Module) -> set[str]:
    """Checkpoint names of the trainable non-adapter parameters."""
    return {base_checkpoint_name(canonical_name(n)) for n, p in model.named_parameters() if p.requires_grad and not is_adapter_name(n)}


# init_lora_weights values peft computes without the base weights' values (the others need a loaded base).
INIT_WITHOUT_BASE = (True, False, "gaussian", "orthogonal")
# peft's variants a meta build can initialize; any other one would keep memory it never wrote.
_SUPPORTED_VARIANTS = ("DoraLinearVariant", "DoraEmbeddingVariant")


def _base_twin(layer: nn.Module, with_values: bool) -> nn.Module:
    """What peft's init sees as ``base_layer``: a copy with the full loaded weights (DoRA's magnitude is their
    column norm), or for every other init (which reads the dtype at most) a 0-element fp32 stand-in: no gather."""
    from torch.distributed.tensor import DTensor

    from lightning_automodel.core.init import plain_copy

    base = layer.get_base_layer()
    if with_values:
        weight = getattr(base, "weight", None)
        if weight is not None and not weight.is_meta and not isinstance(weight, DTensor):
            return base  # unsharded and real (one device, DDP, a bitsandbytes base): peft reads it as it is
        twin = plain_copy(base)

        def full(p: torch.Tensor) -> nn.Parameter:  # a collective for a DTensor: every rank calls it in the same order
            return nn.Parameter((p.full_tensor() if isinstance(p, DTensor) else p).detach().to("cpu"), requires_grad=False)

        set_own_slots(twin, parameters={n: (full(p) if p is not None else None) for n, p in own_parameters(base).items()})
        return twin
    stand_in = nn.Module()
    # peft reads the dtype and device of the base's ``weight`` (a ParamWrapper: of the wrapped parameter).
    for attr in {"weight", getattr(layer, "parameter_name", "weight")}:
        setattr(stand_in, attr, nn.Parameter(torch.empty(0), requires_grad=False))
    stand_in.bias = nn.Parameter(torch.empty(0), requires_grad=False) if getattr(base, "bias", None) is not None else None
    stand_in.is_transposed = getattr(base, "is_transposed", False)
    return stand_in


def _layer_config(layer: nn.Module, init: bool | str) -> Any:
    """The ``LoraConfig`` peft's ``update_layer`` needs, from what the layer recorded at injection."""
    from peft import LoraConfig

    variant = layer_variant(layer, ADAPTER_NAME)
    if variant is not None and type(variant).__name__ not in _SUPPORTED_VARIANTS:
        raise LoraConfigError(
            f"LoRA variant {type(variant).__name__} cannot be initialized on a meta-device build; use plain LoRA or use_dora."
        )
    return LoraConfig(init_lora_weights=init, **layer_settings(layer, ADAPTER_NAME))


def _adapter_twin(layer: nn.Module, base: nn.Module) -> nn.Module:
    """A LoRA layer copy over ``base``: peft's ``update_layer`` builds on it at full size, leaving the layer alone."""
    from lightning_automodel.core.init import plain_copy

    twin = plain_copy(layer)
    twin.__dict__.update({k: dict(v) for k, v in layer.__dict__.items() if type(v) is dict and not k.startswith("_")})
    set_own_slots(
        twin,
        parameters={},
        buffers={},
        children={name: (base if name == BASE_LAYER else type(child)()) for name, child in own_children(layer).items() if child is not None},
    )
    return twin


def _adapter_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The layer's adapter parameters by name within the layer (``lora_A.default.weight``, ...)."""
    return {name: p for name, p in layer.named_parameters() if not name.startswith(f"{BASE_LAYER}.") and is_adapter_name(name)}


@torch.no_grad()
def initialize_adapters(model: nn.Module, seed: int = 0, init: bool | str = True) -> int:
    """peft's own adapter init on every LoRA layer (after the base loaded), built on a CPU twin seeded by (seed,
    layer name), this rank's part copied out: peft's values at every world size. Returns the tensors set."""
    from peft.tuners.lora import LoraLayer

    from lightning_automodel.core.distributed import copy_local_part

    if init not in INIT_WITHOUT_BASE:
        raise LoraConfigError(f"init_lora_weights={init!r} cannot be computed on a meta-device build; use one of {INIT_WITHOUT_BASE}.")
    count = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or not _adapter_tensors(layer):
            continue
        config = _layer_config(layer, init)
        twin = _adapter_twin(layer, _base_twin(layer, with_values=bool(config.use_dora)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(module_seed(seed, name))
            create_adapter(twin, ADAPTER_NAME, config)
        made = _adapter_tensors(twin)
        for key, param in _adapter_tensors(layer).items():
            if key not in made:
                raise LoraConfigError(f"peft's init of {name} made no {key}; this peft version's LoRA layer is not supported.")
            copy_local_part(param, made[key].to(torch.float32))
            count += 1
    return count


def adapter_parameter_count(model: nn.Module) -> int:
    """Elements of the adapter parameters (meta fine; DTensor: global)."""
    return sum(p.numel() for name, p in model.named_parameters() if is_adapter_name(name))


def peft_adapter_files(config: Any, adapters: Mapping[str, torch.Tensor], base_model: str | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json content, adapter_model.safetensors tensors)`` for ``PeftModel.from_pretrained``."""
    data = json.loads(config_to_json(config))
    data["base_model_name_or_path"] = base_model
    data["peft_type"] = "LORA"
    data.setdefault("task_type", "CAUSAL_LM")
    data["inference_mode"] = True
    # PEFT's saved key: a ``base_model.model.`` prefix, no adapter-name component
    tensors = {
        "base_model.model." + ".".join(p for p in name.split(".") if p != ADAPTER_NAME): tensor.detach().contiguous()
        for name, tensor in adapters.items()
    }
    return data, tensors
