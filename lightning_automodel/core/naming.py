"""Canonical names: without the wrapper components activation checkpointing, ``torch.compile`` and FSDP1 insert,
so a YAML keeps matching whatever wrapping the run applies; and how peft names LoRA adapters."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

WRAPPER_PREFIXES: tuple[str, ...] = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
WRAPPER_COMPONENTS: frozenset[str] = frozenset(prefix[:-1] for prefix in WRAPPER_PREFIXES)
# peft keeps an adapted nn.Linear as ``base_layer`` and adds ``lora_A.<adapter>`` / ``lora_B.<adapter>``.
ADAPTER_NAME = "default"
BASE_LAYER = "base_layer"


def canonical_name(name: str) -> str:
    """Strip every whole wrapper component: ``layers.0._orig_mod.mlp`` -> ``layers.0.mlp``; ``foo_orig_mod`` stays."""
    if "._" not in name and not name.startswith("_"):
        return name  # every wrapper component starts with "_": the common case costs one scan
    parts = name.split(".")
    kept = [part for part in parts if part not in WRAPPER_COMPONENTS]
    return name if len(kept) == len(parts) else ".".join(kept)


def canonical_named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` with canonical names; a wrapper and the module it wraps share one name."""
    for name, module in model.named_modules(remove_duplicate=False):
        yield canonical_name(name), module


def modules_by_canonical_name(model: nn.Module) -> dict[str, nn.Module]:
    """Canonical name -> the innermost module of that name, in one traversal (for many lookups)."""
    return dict(canonical_named_modules(model))


def get_module_by_canonical_name(model: nn.Module, name: str, *, outermost: bool = False) -> nn.Module | None:
    """The module named ``name``: the innermost when wrappers share it, or with ``outermost`` the first in
    ``named_modules()`` order, as the reference's ``_get_module_by_normalized_name``."""
    if outermost:
        return next((module for module_name, module in model.named_modules() if canonical_name(module_name) == name), None)
    found = None
    for module_name, module in canonical_named_modules(model):
        if module_name == name:
            found = module
    return found


def unique_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Canonical names and parameters, each parameter once (tied weights under their first name)."""
    seen: set[int] = set()
    out = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in seen:
            seen.add(id(param))
            out.append((canonical_name(name), param))
    return out


def is_adapter_name(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def base_checkpoint_name(name: str) -> str:
    """The un-adapted checkpoint's name for ``name`` (``q_proj.base_layer.weight`` -> ``q_proj.weight``)."""
    if f".{BASE_LAYER}." not in f".{name}.":
        return name
    return ".".join(part for part in name.split(".") if part != BASE_LAYER)
