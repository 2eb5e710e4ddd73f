"""Canonical parameter and module names.

Activation checkpointing, ``torch.compile`` and FSDP1 insert wrapper components into dotted names
(``layers.0._checkpoint_wrapped_module.self_attn``). Everything a user configures or reads
(selectors, state_dict names, messages) uses names with those components removed, so a YAML keeps
matching whatever wrapping the run applies.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

WRAPPER_PREFIXES: tuple[str, ...] = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
WRAPPER_COMPONENTS: frozenset[str] = frozenset(prefix[:-1] for prefix in WRAPPER_PREFIXES)


def canonical_name(name: str) -> str:
    """Strip every wrapper component (see ``WRAPPER_PREFIXES``) anywhere in a dotted name.

    Only whole components go: ``layers.0._orig_mod.mlp`` -> ``layers.0.mlp``, but a module that
    merely ends in the same letters (``foo_orig_mod``) keeps its name.
    """
    if "._" not in name and not name.startswith("_"):
        return name  # every wrapper component starts with "_": the common case costs one scan
    parts = name.split(".")
    kept = [part for part in parts if part not in WRAPPER_COMPONENTS]
    return name if len(kept) == len(parts) else ".".join(kept)


def canonical_named_parameters(
    model: nn.Module, *, remove_duplicate: bool = True
) -> Iterator[tuple[str, nn.Parameter]]:
    """``named_parameters`` with canonical names."""
    for name, param in model.named_parameters(remove_duplicate=remove_duplicate):
        yield canonical_name(name), param


def canonical_named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` with canonical names; wrapper modules collapse onto the module they wrap."""
    for name, module in model.named_modules(remove_duplicate=False):
        yield canonical_name(name), module


def modules_by_canonical_name(model: nn.Module) -> dict[str, nn.Module]:
    """Canonical name -> module in one traversal (the innermost when wrappers share a name): for many lookups."""
    return dict(canonical_named_modules(model))


def get_module_by_canonical_name(model: nn.Module, name: str) -> nn.Module | None:
    """The module whose canonical name is ``name`` (the innermost one when wrappers share it)."""
    return modules_by_canonical_name(model).get(name)


def unique_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Canonical names and parameters, each parameter once (tied weights under their first name)."""
    seen: set[int] = set()
    out = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in seen:
            seen.add(id(param))
            out.append((canonical_name(name), param))
    return out
