"""The FSDP2 layout of a Hugging Face model (torchtitan's), one definition for the sharding code and the planner.

Groups: each decoder layer and tower, ``embedding``, ``norm+head`` (or, tied, ``embedding+norm+head``: FSDP2 rejects
a parameter in two groups) and ``root`` for the rest. Shapes and identities only: works on meta.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from lightning_automodel.core.discovery import text_decoder_layers_path
from lightning_automodel.core.naming import canonical_named_modules, unique_named_parameters

log = logging.getLogger(__name__)

ROOT_GROUP = "root"
#: Groups that stay unsharded from their forward to their backward (``reshard_after_forward=False``).
KEPT_UNSHARDED_GROUPS: frozenset[str] = frozenset({"norm+head", ROOT_GROUP})
TOWER_ATTRIBUTES: tuple[str, ...] = ("vision_tower", "visual", "vision_model", "audio_tower")
#: The norm after the last decoder layer, looked up next to the layer list (never a tower's norm).
FINAL_NORM_ATTRIBUTES: tuple[str, ...] = ("norm", "final_layernorm", "final_norm", "ln_f")


@dataclass(frozen=True)
class ShardingUnit:
    """Modules that FSDP2 all-gathers together (one ``fully_shard`` call)."""

    name: str
    modules: tuple[nn.Module, ...]
    reshard_after_forward: bool = True


def _has_params(module: nn.Module | None) -> bool:
    return module is not None and any(True for _ in module.parameters())


def _call_or_none(model: nn.Module, method: str) -> nn.Module | None:
    """``model.get_input_embeddings()`` and friends; some remote-code models raise instead of returning None."""
    fn = getattr(model, method, None)
    try:
        module = fn() if callable(fn) else None
    except (NotImplementedError, AttributeError):
        return None
    return module if isinstance(module, nn.Module) else None


def _index(model: nn.Module) -> tuple[dict[str, nn.Module], dict[int, str]]:
    """Modules by canonical path (the innermost when wrappers share one) and each module's first path."""
    by_name: dict[str, nn.Module] = {}
    path_of: dict[int, str] = {}
    for name, module in canonical_named_modules(model):
        by_name[name] = module
        path_of.setdefault(id(module), name)
    return by_name, path_of


def _group_paths(model: nn.Module, by_name: dict[str, nn.Module], path_of: dict[int, str]) -> list[tuple[str, list[str]]]:
    layers_path = text_decoder_layers_path(model)
    layers = by_name.get(layers_path) if layers_path else None
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"Could not find the text decoder layers of {type(model).__name__}: no FSDP2 layout for it.")
    groups = [(f"{layers_path}.{i}", [f"{layers_path}.{i}"]) for i in range(len(layers))]
    seen_towers: set[int] = set()
    for owner in (model, getattr(model, "model", None)):
        if not isinstance(owner, nn.Module):
            continue
        for attr in TOWER_ATTRIBUTES:
            tower = getattr(owner, attr, None)
            if isinstance(tower, nn.Module) and id(tower) not in seen_towers and _has_params(tower) and id(tower) in path_of:
                seen_towers.add(id(tower))
                groups.append((path_of[id(tower)], [path_of[id(tower)]]))
    embed = _call_or_none(model, "get_input_embeddings")
    head = _call_or_none(model, "get_output_embeddings")
    embed_path = path_of.get(id(embed)) if _has_params(embed) else None
    head_path = path_of.get(id(head)) if _has_params(head) else None
    parent_path = layers_path.rpartition(".")[0]
    parent = by_name.get(parent_path) if parent_path else model
    norm_path = None
    for attr in FINAL_NORM_ATTRIBUTES:
        if isinstance(getattr(parent, attr, None), nn.Module):
            norm_path = f"{parent_path}.{attr}" if parent_path else attr
            break
    if norm_path is not None and not _has_params(by_name.get(norm_path)):
        norm_path = None
    tail = [p for p in (norm_path, head_path) if p is not None]
    embed_weight = getattr(embed, "weight", None)
    if embed_weight is not None and getattr(head, "weight", None) is embed_weight:
        groups.append(("embedding+norm+head", [p for p in (embed_path, *tail) if p is not None]))
    else:
        groups += [("embedding", [embed_path])] if embed_path is not None else []
        groups += [("norm+head", tail)] if tail else []
    return [*groups, (ROOT_GROUP, [])]


def fsdp2_group_modules(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The layout as ``(group, module paths)`` in ``fully_shard`` order; ValueError without decoder layers."""
    return _group_paths(model, *_index(model))


def fsdp2_units(model: nn.Module) -> list[ShardingUnit]:
    """The layout as modules, root excluded; ``norm+head`` stays gathered between forward and backward."""
    by_name, path_of = _index(model)
    units = []
    for group, paths in _group_paths(model, by_name, path_of):
        modules = tuple(by_name[path] for path in paths if path in by_name)
        if group != ROOT_GROUP and modules:
            units.append(ShardingUnit(group, modules, reshard_after_forward=group not in KEPT_UNSHARDED_GROUPS))
    return units


def fsdp2_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The layout as ``(group name, canonical parameter names)``: each parameter in the first group holding it (as
    nested ``fully_shard``), the root always listed. Not modelled: ``apply_fsdp2``'s single-dtype sub-groups."""
    unique = unique_named_parameters(model)
    first_name = {id(p): name for name, p in unique}
    claimed: set[int] = set()
    by_name, path_of = _index(model)
    out: list[tuple[str, list[str]]] = []
    for group, paths in _group_paths(model, by_name, path_of):
        params: Iterable[nn.Parameter] = (
            (p for _, p in unique) if group == ROOT_GROUP else (p for path in paths if path in by_name for p in by_name[path].parameters())
        )
        names = []
        for p in params:
            if id(p) not in claimed:
                claimed.add(id(p))
                names.append(first_name[id(p)])
        out.append((group, names))
    log.debug("FSDP2 layout of %s: %d groups", type(model).__name__, len(out))
    return out
