"""LoRA adapters on a Hugging Face model, in place, through peft; built on meta, sharded with their layer.

peft's ``inject_adapter_in_model`` replaces each targeted ``nn.Linear`` by a LoRA layer that keeps the
original as ``base_layer`` and adds ``lora_A.<adapter>`` / ``lora_B.<adapter>``; the model keeps its
class and its names (no ``base_model.model.`` prefix as with ``get_peft_model``). Everything here
works on a meta model, before FSDP2 shards it, so the adapters are sharded with their decoder layer:

* :func:`inject_lora` checks every ``target_modules`` name first (the model is untouched on error);
* checkpoints of the un-adapted model load unchanged: :func:`base_checkpoint_name` drops the
  ``base_layer`` component, which is what the loader maps checkpoint keys to;
* :func:`initialize_adapters` gives the adapters peft's init (``lora_A`` Kaiming-uniform or Gaussian,
  ``lora_B`` zero) from a CPU twin per adapter seeded by (seed, name): the same numbers at every
  world size, each rank copying its shard;
* export: :func:`peft_adapter_files` (what ``PeftModel.from_pretrained`` reads); merging is
  ``core.lora_merge`` (peft's own per-layer merge).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"
BASE_LAYER = "base_layer"
BASE_RULE = "LoRA (base weights frozen)"


class LoraConfigError(ValueError):
    """A LoRA setting does not fit the model; the message names it and the fix."""


def lora_config(
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    exclude_modules: str | list[str] | None = None,
    **extra: Any,
) -> Any:
    """A ``peft.LoraConfig`` (any other ``LoraConfig`` field passes through ``extra``)."""
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
    if init not in (True, False, "gaussian"):
        raise LoraConfigError(
            f"init_lora_weights={init!r} needs the base weights at init (PiSSA, OLoRA, LoftQ...), which a meta-device "
            "build does not have; use true (peft's default), gaussian or false."
        )
    try:
        return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                          exclude_modules=exclude_modules, **extra)
    except (TypeError, ValueError) as exc:
        raise LoraConfigError(f"invalid LoRA configuration: {exc}") from None


def config_to_json(config: Any) -> str:
    """The ``LoraConfig`` as JSON (sets become sorted lists), for checkpoints and ``adapter_config.json``."""
    data = config.to_dict()
    return json.dumps(data, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v), sort_keys=True)


def config_from_json(text: str) -> Any:
    from peft import LoraConfig

    data = json.loads(text)
    fields = set(LoraConfig.__dataclass_fields__)
    return LoraConfig(**{k: v for k, v in data.items() if k in fields and k not in ("peft_type", "task_type")})


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct last components of the model's ``nn.Linear`` modules (``q_proj``, ``gate_proj``, ...)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)})


def _check_targets(model: nn.Module, config: Any) -> None:
    targets = config.target_modules
    if isinstance(targets, str):
        return  # "all-linear" or a regex: peft reports a regex that matches nothing
    names = [name for name, _ in model.named_modules()]
    for target in sorted(targets):
        if not any(name == target or name.endswith(f".{target}") for name in names):
            some = ", ".join(linear_module_names(model)[:8]) or "none"
            raise LoraConfigError(f"LoRA target_modules entry {target!r} matches no module of the model; its linear layers are: {some}.")


def inject_lora(model: nn.Module, config: Any) -> list[str]:
    """Inject adapters in place and return the adapted module names (the model is untouched on error)."""
    from peft import inject_adapter_in_model

    if any(is_adapter_name(name) for name, _ in model.named_parameters()):
        raise LoraConfigError("the model already has LoRA adapters; add the LoRA callback once.")
    _check_targets(model, config)
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    except ValueError as exc:
        some = ", ".join(linear_module_names(model)[:8]) or "none"
        raise LoraConfigError(f"LoRA could not be applied: {' '.join(str(exc).split())} (linear layers: {some}).") from None
    return adapted_modules(model)


def adapted_modules(model: nn.Module) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def is_adapter_name(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def base_checkpoint_name(name: str) -> str:
    """The name the un-adapted model's checkpoint uses for ``name`` (``q_proj.base_layer.weight`` -> ``q_proj.weight``)."""
    if f".{BASE_LAYER}." not in f".{name}.":
        return name
    return ".".join(part for part in name.split(".") if part != BASE_LAYER)


def freeze_base(model: nn.Module, trainable_before: set[str] | None = None) -> dict[str, str]:
    """Freeze every parameter that is not an adapter; returns canonical name -> rule for those LoRA froze.

    peft's injection already freezes the base, so ``trainable_before`` (checkpoint names of what was
    trainable before the injection) tells which frozen parameters are LoRA's doing.
    """
    from lightning_automodel.core.naming import canonical_name

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
    """Checkpoint names of the trainable parameters (what :func:`freeze_base` compares against)."""
    from lightning_automodel.core.naming import canonical_name

    return {base_checkpoint_name(canonical_name(n)) for n, p in model.named_parameters() if p.requires_grad and not is_adapter_name(n)}


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def initialize_adapters(model: nn.Module, seed: int = 0, init: bool | str = True) -> int:
    """peft's adapter init, identical at every world size; returns the number of adapter tensors set.

    ``lora_A`` gets Kaiming-uniform (a = sqrt(5), as ``nn.Linear``) or N(0, 1/r) for ``gaussian``, drawn
    on the CPU at full size from a generator seeded by (seed, name) and copied into this rank's shard;
    ``lora_B`` (and a LoRA bias) zero, so the adapted model starts equal to the base.
    """
    from peft.tuners.lora import LoraLayer

    from lightning_automodel.core.sharded_load import copy_local_part

    count = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer) or ADAPTER_NAME not in layer.lora_A:
            continue
        a, b = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]
        if init is not False:
            generator = torch.Generator().manual_seed(_seed_for(seed, name))
            full = torch.empty(tuple(a.weight.shape), dtype=torch.float32)
            if init == "gaussian":
                full.normal_(0.0, 1.0 / layer.r[ADAPTER_NAME], generator=generator)
            else:
                bound = 1.0 / math.sqrt(full.shape[1]) if full.shape[1] else 0.0  # kaiming_uniform_(a=sqrt(5))
                full.uniform_(-bound, bound, generator=generator)
            copy_local_part(a.weight, full)
            copy_local_part(b.weight, torch.zeros(tuple(b.weight.shape)))
            if getattr(b, "bias", None) is not None:
                copy_local_part(b.bias, torch.zeros(tuple(b.bias.shape)))
        count += 2
    return count


def adapter_parameter_count(model: nn.Module) -> int:
    """Elements of the adapter parameters (meta fine; DTensor: global)."""
    return sum(p.numel() for name, p in model.named_parameters() if is_adapter_name(name))


def peft_adapter_key(name: str) -> str:
    """Our adapter name -> PEFT's saved key: ``base_model.model.`` prefix, no adapter-name component."""
    parts = [part for part in name.split(".") if part != ADAPTER_NAME]
    return "base_model.model." + ".".join(parts)


def peft_adapter_files(config: Any, adapters: Mapping[str, torch.Tensor], base_model: str | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(adapter_config.json content, adapter_model.safetensors tensors)`` for ``PeftModel.from_pretrained``."""
    data = json.loads(config_to_json(config))
    data["base_model_name_or_path"] = base_model
    data["peft_type"] = "LORA"
    data.setdefault("task_type", "CAUSAL_LM")
    data["inference_mode"] = True
    tensors = {peft_adapter_key(name): tensor.detach().contiguous() for name, tensor in adapters.items()}
    return data, tensors
