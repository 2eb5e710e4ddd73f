"""Private transformers names the package needs (checked on transformers 5.25.0)."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from torch import nn

# Set by transformers' init on a parameter it handled; a parameter rebuilt on another device must carry it
# over or transformers re-initializes it. Why private: set and read only by transformers' loading code.
HF_INITIALIZED_FLAG = "_is_hf_initialized"

_MISSING = object()


def declared_tied_weights(model: nn.Module) -> Any:
    """The class's declared ``_tied_weights_keys`` or None. Why private: the public ``get_expanded_tied_weights_keys``
    is ``{}`` when the config does not tie, but a checkpoint saved tied still needs the declared source."""
    return getattr(model, "_tied_weights_keys", None)


def init_weights_hook(model: nn.Module) -> Any:
    """``model._init_weights`` or None. Why private: the public ``init_weights`` runs on the whole model at full
    size; one (sharded) module at a time needs the hook itself."""
    return getattr(model, "_init_weights", None)


def _init_module() -> ModuleType:
    try:
        return importlib.import_module("transformers.initialization")
    except ImportError:  # transformers 4.x
        return importlib.import_module("transformers.modeling_utils")


@contextlib.contextmanager
def init_weights_flag_off() -> Iterator[None]:
    """Transformers' module flag ``_init_weights`` False for the block. Why private: the 4.x switch behind
    ``no_init_weights`` (which also replaces ``torch.nn.init``, which ``skip_random_init`` must not do); 5.25
    no longer reads it; kept for the nemo-compatible contract."""
    module = _init_module()
    previous = module.__dict__.get("_init_weights", _MISSING)
    module._init_weights = False  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if previous is _MISSING:
            module.__dict__.pop("_init_weights", None)
        else:
            module._init_weights = previous  # type: ignore[attr-defined]


def loaded_weight_conversions(model: nn.Module) -> Any:
    """``model._weight_conversions`` (what ``from_pretrained`` recorded), or None. Why private: no public
    getter; ``revert_weight_conversion`` (used by ``save_pretrained``) reads this attribute first."""
    return getattr(model, "_weight_conversions", None)


@contextlib.contextmanager
def weight_conversions_set(model: nn.Module, conversions: Any) -> Iterator[None]:
    """``model._weight_conversions = conversions`` for the block. Why private: the only way to hand
    ``revert_weight_conversion`` conversions computed once, not re-walking the model per tensor group."""
    had_own = "_weight_conversions" in model.__dict__
    previous = model.__dict__.get("_weight_conversions")
    model.__dict__["_weight_conversions"] = conversions
    try:
        yield
    finally:
        if had_own:
            model.__dict__["_weight_conversions"] = previous
        else:
            del model.__dict__["_weight_conversions"]


# transformers' weight-conversion protocol, lazily by name. Why here: not underscore-named but undocumented
# internal loading machinery (new in 5.0) whose classes' patterns and operations the save and load plans match.
_CONVERSION_PROTOCOL = {
    "MergeModulelist": "transformers.core_model_loading",
    "PrefixChange": "transformers.core_model_loading",
    "WeightConverter": "transformers.core_model_loading",
    "WeightRenaming": "transformers.core_model_loading",
    "apply_converters": "transformers.core_model_loading",
    "dot_natural_key": "transformers.core_model_loading",
    "rename_source_key": "transformers.core_model_loading",
    "revert_weight_conversion": "transformers.core_model_loading",
    "get_model_conversion_mapping": "transformers.conversion_mapping",
}


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): importing the conversion machinery costs time that fit's import path does not need.
    module = _CONVERSION_PROTOCOL.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
