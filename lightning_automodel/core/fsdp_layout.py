"""The FSDP2 layout of a Hugging Face model: which parameters are all-gathered together.

One function decides the grouping so that the sharding code and the memory planner cannot disagree:
the planner's "largest group in flight" is only right if it sees the groups the job really shards.
The layout is torchtitan's:

- each text decoder layer is its own group (``model.layers.3``);
- each vision/audio tower is its own group (``model.vision_tower``);
- the input embedding is its own group (``embedding``);
- the final norm and the LM head are one group (``norm+head``), kept unsharded between forward and
  backward (``reshard_after_forward=False``): backward needs it first, re-gathering it at once is waste;
- with tied embeddings the embedding, final norm and head are one group (``embedding+norm+head``),
  since FSDP2 rejects a parameter managed by two groups;
- the root group (``root``) gets whatever is left (a VLM's projector, stray norms). FSDP2 keeps the
  root unsharded after forward by default (its ``reshard_after_forward=None`` means False for the root).

Only shapes and identities are read, so it works on meta models. No Lightning here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from torch import nn

from lightning_automodel.core.discovery import text_decoder_layers_path
from lightning_automodel.core.naming import canonical_named_modules, get_module_by_canonical_name, unique_named_parameters

log = logging.getLogger(__name__)

EMBEDDING_GROUP = "embedding"
NORM_HEAD_GROUP = "norm+head"
TIED_GROUP = "embedding+norm+head"
ROOT_GROUP = "root"
#: Groups that stay unsharded from their forward to their backward (``reshard_after_forward=False``).
KEPT_UNSHARDED_GROUPS: frozenset[str] = frozenset({NORM_HEAD_GROUP, ROOT_GROUP})

#: Attribute names of vision/audio towers, looked up on the model and on ``model.model``.
TOWER_ATTRIBUTES: tuple[str, ...] = ("vision_tower", "visual", "vision_model", "audio_tower")
#: Attribute names of the norm after the last decoder layer, looked up next to the layer list.
FINAL_NORM_ATTRIBUTES: tuple[str, ...] = ("norm", "final_layernorm", "final_norm", "ln_f")


class _ModuleIndex:
    """Modules by canonical path (the innermost when wrappers share one) and each module's first path."""

    def __init__(self, model: nn.Module) -> None:
        self.by_name: dict[str, nn.Module] = {}
        self.path_by_id: dict[int, str] = {}
        for name, module in canonical_named_modules(model):
            self.by_name[name] = module
            self.path_by_id.setdefault(id(module), name)

    def get(self, path: str) -> nn.Module | None:
        return self.by_name.get(path)

    def path_of(self, target: nn.Module | None) -> str | None:
        return self.path_by_id.get(id(target)) if target is not None else None


def _has_params(module: nn.Module | None) -> bool:
    return module is not None and any(True for _ in module.parameters())


def _call_or_none(model: nn.Module, method: str) -> nn.Module | None:
    """``model.get_input_embeddings()`` and friends; some remote-code models raise instead of returning None."""
    fn = getattr(model, method, None)
    if not callable(fn):
        return None
    try:
        module = fn()
    except (NotImplementedError, AttributeError):
        return None
    return module if isinstance(module, nn.Module) else None


def final_norm_path(model: nn.Module, layers_path: str | None = None, *, index: _ModuleIndex | None = None) -> str | None:
    """Canonical path of the norm after the last decoder layer: the norm *next to* the layer list.

    ``model.norm`` for a llama, ``model.language_model.norm`` for a LLaVA. Looking next to the layers
    (not for any module called ``norm``) keeps a vision tower's norm out of the ``norm+head`` group.
    """
    layers_path = layers_path if layers_path is not None else text_decoder_layers_path(model)
    if layers_path is None:
        return None
    parent_path = layers_path.rpartition(".")[0]
    if not parent_path:
        parent = model
    elif index is not None:
        parent = index.get(parent_path)
    else:
        parent = get_module_by_canonical_name(model, parent_path)
    for attr in FINAL_NORM_ATTRIBUTES:
        norm = getattr(parent, attr, None)
        if isinstance(norm, nn.Module):
            return f"{parent_path}.{attr}" if parent_path else attr
    return None


def fsdp2_group_modules(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The layout as ``(group name, canonical module paths)``, in the order ``fully_shard`` is applied.

    The root group has no module paths (it is ``fully_shard(model)`` itself). Raises ``ValueError``
    when the text decoder layers cannot be found: sharding everything as one root group would keep the
    whole model unsharded during forward, which is never what a user wants silently.
    """
    return _group_modules(model, _ModuleIndex(model))


def _group_modules(model: nn.Module, index: _ModuleIndex) -> list[tuple[str, list[str]]]:
    layers_path = text_decoder_layers_path(model)
    layers = index.get(layers_path) if layers_path else None
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"Could not find the text decoder layers of {type(model).__name__}: no FSDP2 layout for it.")
    groups: list[tuple[str, list[str]]] = [(f"{layers_path}.{i}", [f"{layers_path}.{i}"]) for i in range(len(layers))]
    seen_towers: set[int] = set()
    for owner in (model, getattr(model, "model", None)):
        if not isinstance(owner, nn.Module):
            continue
        for attr in TOWER_ATTRIBUTES:
            tower = getattr(owner, attr, None)
            if isinstance(tower, nn.Module) and id(tower) not in seen_towers and _has_params(tower):
                seen_towers.add(id(tower))
                path = index.path_of(tower)
                if path:
                    groups.append((path, [path]))
    embed = _call_or_none(model, "get_input_embeddings")
    head = _call_or_none(model, "get_output_embeddings")
    embed_path = index.path_of(embed) if _has_params(embed) else None
    head_path = index.path_of(head) if _has_params(head) else None
    norm_path = final_norm_path(model, layers_path, index=index)
    if norm_path is not None and not _has_params(index.get(norm_path)):
        norm_path = None
    tail = [p for p in (norm_path, head_path) if p is not None]
    embed_weight = getattr(embed, "weight", None)
    tied = embed_weight is not None and getattr(head, "weight", None) is embed_weight
    if tied:
        groups.append((TIED_GROUP, [p for p in (embed_path, *tail) if p is not None]))
    else:
        if embed_path is not None:
            groups.append((EMBEDDING_GROUP, [embed_path]))
        if tail:
            groups.append((NORM_HEAD_GROUP, tail))
    groups.append((ROOT_GROUP, []))
    return groups


def fsdp2_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The FSDP2 layout as ``(group name, canonical parameter names)``, each parameter in exactly one group.

    Groups come in the order ``fully_shard`` is applied (layers, towers, embedding, norm+head, root);
    a parameter belongs to the first group whose modules hold it, as with nested ``fully_shard`` calls,
    and the root gets every parameter left over. A tied weight appears once, under its first name
    (``model.embed_tokens.weight``). The root group is always listed, possibly empty.

    Not modelled: the extra single-dtype sub-groups the sharding code may add when one group mixes
    trainable parameter dtypes (their bytes stay in the same place, only the grouping is finer).
    """
    unique = unique_named_parameters(model)
    first_name: dict[int, str] = {id(p): name for name, p in unique}
    claimed: set[int] = set()
    index = _ModuleIndex(model)
    out: list[tuple[str, list[str]]] = []
    for group, module_paths in _group_modules(model, index):
        names: list[str] = []
        if group == ROOT_GROUP:
            params: Iterable[nn.Parameter] = (p for _, p in unique)
        else:
            modules = [index.get(path) for path in module_paths]
            params = (p for m in modules if m is not None for p in m.parameters())
        for p in params:
            if id(p) not in claimed:
                claimed.add(id(p))
                names.append(first_name[id(p)])
        out.append((group, names))
    log.debug("FSDP2 layout of %s: %d groups", type(model).__name__, len(out))
    return out
