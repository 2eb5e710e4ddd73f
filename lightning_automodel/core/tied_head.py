"""Tied LM heads. A meta build or sharding silently breaks the alias, so (reference PRs #1904, #2511) "tied" is a
storage fact: only a real alias may be dropped from a checkpoint, and a checkpoint without ``lm_head.weight``
gets the head from its embedding source."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from lightning_automodel._compat.transformers import declared_tied_weights
from lightning_automodel.core.distributed import local_tensor
from lightning_automodel.core.naming import canonical_name, get_module_by_canonical_name

_EMBEDDING_FALLBACK_NAMES: tuple[str, ...] = (
    "model.language_model.embed_tokens.weight", "language_model.embed_tokens.weight",
    "model.embed_tokens.weight", "embed_tokens.weight",
)


class TieSupport(Enum):
    """Which ``tie_word_embeddings`` settings a model class supports (class attribute ``tie_word_embeddings_support``)."""

    BOTH = "both"
    TIED_ONLY = "tied_only"
    UNTIED_ONLY = "untied_only"


def _controlling_tie_word_embeddings(config: object) -> bool:
    """The flag Hugging Face ties by: top-level first, then an Omni ``thinker_config``, then the text config."""
    if hasattr(config, "tie_word_embeddings"):
        return bool(config.tie_word_embeddings)
    thinker = getattr(config, "thinker_config", None)
    if thinker is not None:
        return bool(getattr(thinker, "tie_word_embeddings", False))
    get_text_config = getattr(config, "get_text_config", None)
    text_config = get_text_config() if callable(get_text_config) else None
    return bool(getattr(text_config, "tie_word_embeddings", False))


def is_tied_word_embeddings(model: nn.Module) -> bool:
    """Whether the model is *configured* to tie its head (the class attribute wins over the config)."""
    support = getattr(type(model), "tie_word_embeddings_support", None)
    if support is TieSupport.TIED_ONLY:
        return True
    return support is not TieSupport.UNTIED_ONLY and _controlling_tie_word_embeddings(getattr(model, "config", None))


def get_lm_head_module(model: nn.Module) -> nn.Module | None:
    """``get_output_embeddings()`` when it returns a module, else the first ``*lm_head`` module with a weight."""
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        head = get_output()
        if head is not None:
            return head
    for name, module in model.named_modules():
        if (name == "lm_head" or name.endswith(".lm_head")) and hasattr(module, "weight"):
            return module
    return None


def get_lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The full LM-head weight. For a DTensor this all-gathers: every rank must call it."""
    weight = getattr(get_lm_head_module(model), "weight", None)
    if weight is None:
        weight = get_lm_head_weight_and_name(model)[0]
    if weight is None:
        raise ValueError("lm_head.weight not found in model")
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def get_lm_head_weight_and_name(model: nn.Module) -> tuple[torch.Tensor | None, str | None]:
    """The local LM-head parameter (a DTensor stays a DTensor) and its canonical name."""
    for name, param in model.named_parameters(remove_duplicate=False):
        name = canonical_name(name)
        if "lm_head" in name and name.endswith(".weight"):
            return param, name
    return None, None


def get_input_embeddings_weight_and_name(model: nn.Module) -> tuple[torch.Tensor | None, str | None]:
    """The input-embedding parameter and its canonical name (``get_input_embeddings()`` first)."""
    weight = None
    get_input = getattr(model, "get_input_embeddings", None)
    if callable(get_input):
        try:
            weight = getattr(get_input(), "weight", None)
        except Exception:  # noqa: BLE001 - models without embeddings raise NotImplementedError and others
            weight = None
    named = [(canonical_name(name), param) for name, param in model.named_parameters(remove_duplicate=False)]
    for name, param in named:
        if weight is not None and param is weight:
            return param, name
    for name, param in named:
        if name.endswith("embed_tokens.weight"):
            return param, name
    return None, None


def same_tensor_storage(left: torch.Tensor, right: torch.Tensor) -> bool:
    """Whether two tensors are one alias (same object, or same storage pointer and offset; meta never)."""
    if left is right:
        return True
    la, lb = local_tensor(left), local_tensor(right)
    if la is lb:
        return True
    if la.device.type == "meta" or lb.device.type == "meta":
        return False
    try:
        return (
            la.untyped_storage().data_ptr() == lb.untyped_storage().data_ptr()
            and la.storage_offset() == lb.storage_offset()
        )
    except RuntimeError:
        return False


def has_local_tied_lm_head(model: nn.Module) -> bool:
    """Configured tied, both weights present here, same shape, and truly one storage."""
    return diagnose_tie(model).locally_tied


@dataclass(frozen=True)
class TieStatus:
    """Why a model's head is or is not tied, for messages users can act on."""

    config_tied: bool
    locally_tied: bool
    reason: str | None = None


def diagnose_tie(model: nn.Module) -> TieStatus:
    """Explain the tie state: configured tied? aliased here? if not, why not."""
    if not is_tied_word_embeddings(model):
        return TieStatus(False, False, "the config does not tie word embeddings (tie_word_embeddings is false)")
    head, head_name = get_lm_head_weight_and_name(model)
    embed, embed_name = get_input_embeddings_weight_and_name(model)
    if head is None:
        return TieStatus(True, False, "no lm_head weight on this rank (a pipeline stage without the head?)")
    if embed is None:
        return TieStatus(True, False, f"{head_name} has no input-embedding weight on this rank to alias")
    if tuple(head.shape) != tuple(embed.shape):
        return TieStatus(
            True, False,
            f"the config says tied but {head_name} {list(head.shape)} and {embed_name} {list(embed.shape)} "
            "differ in shape, so they cannot share storage; set tie_word_embeddings=False or fix the vocabulary size",
        )
    if not same_tensor_storage(head, embed):
        return TieStatus(True, False, f"{head_name} and {embed_name} are separate tensors (the alias was broken)")
    return TieStatus(True, True, None)


def ensure_tied_lm_head(model: nn.Module) -> bool:
    """Re-alias a configured-tied head (``tie_weights()``, else by assignment); whether tied after. Never raises."""
    if not is_tied_word_embeddings(model):
        return False
    head, head_name = get_lm_head_weight_and_name(model)
    embed, _ = get_input_embeddings_weight_and_name(model)
    if head is None or embed is None or tuple(head.shape) != tuple(embed.shape):
        return False
    if same_tensor_storage(head, embed):
        return True
    tie_weights = getattr(model, "tie_weights", None)
    if callable(tie_weights):
        try:
            tie_weights()
        except (AttributeError, TypeError, RuntimeError):
            pass
        if has_local_tied_lm_head(model):
            return True
    module_name = head_name.rsplit(".", 1)[0] if "." in head_name else head_name
    head_module = get_module_by_canonical_name(model, module_name, outermost=True) if module_name else None
    if head_module is None:
        return False
    try:
        head_module.weight = embed
    except (AttributeError, TypeError, RuntimeError):
        return False
    return has_local_tied_lm_head(model)


def get_tied_lm_head_source_names(model: nn.Module, lm_head_param_name: str | None = None) -> list[str]:
    """Checkpoint keys a tied head can be rebuilt from, best first, without duplicates."""
    names: list[str] = []
    tied_keys = declared_tied_weights(model)
    if isinstance(tied_keys, Mapping):
        for target, source in tied_keys.items():
            if not isinstance(target, str) or not isinstance(source, str):
                continue  # as the reference: only name -> name entries can source a head
            if lm_head_param_name is None or target == lm_head_param_name or target.endswith("lm_head.weight"):
                names.append(source)
    _, embed_name = get_input_embeddings_weight_and_name(model)
    if embed_name:
        names.append(embed_name)
    names.extend(_EMBEDDING_FALLBACK_NAMES)
    return list(dict.fromkeys(names))


def fill_missing_tied_lm_head(
    state_dict: MutableMapping[str, object], model: nn.Module, *, allow_current_lm_head_fallback: bool = False
) -> bool:
    """Add a missing ``lm_head.weight`` to ``state_dict`` from its embedding source (an alias); True when added."""
    if not is_tied_word_embeddings(model):
        return False
    head, head_name = get_lm_head_weight_and_name(model)
    if head is None or head_name is None or head_name in state_dict:
        return False
    for source in get_tied_lm_head_source_names(model, head_name):
        value = state_dict.get(source)
        if isinstance(value, torch.Tensor):
            state_dict[head_name] = value.detach()
            return True
    if allow_current_lm_head_fallback:
        state_dict[head_name] = head.detach()
        return True
    return False
