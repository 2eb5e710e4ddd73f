"""Building models without allocating or initializing weights.

Both context managers change process-global state (a class method, a transformers module flag), so
both restore exactly what they found, on exceptions too. Neither is thread-safe.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch
from torch import nn

_MISSING = object()
# torchao float8 weight wrappers keep their constructor arguments under private names.
_SUBCLASS_ATTRIBUTE_MAP = {
    "_linear_mm_config": "linear_mm_config",
    "_dtype": "dtype",
    "_precomputed_scale": "precomputed_scale",
}


def _meta_parameter(param: nn.Parameter) -> nn.Parameter:
    meta = param.to(torch.device("meta"))
    cls = type(param)
    if cls is nn.Parameter:
        return nn.Parameter(meta, requires_grad=param.requires_grad)
    kwargs = dict(param.__dict__)
    if cls.__name__ == "WeightWithDynamicFloat8CastTensor":
        kwargs = {new: param.__dict__[old] for old, new in _SUBCLASS_ATTRIBUTE_MAP.items() if old in param.__dict__}
    kwargs.pop("_is_hf_initialized", None)
    return cls(meta, **kwargs, requires_grad=param.requires_grad)


@contextlib.contextmanager
def init_empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """Create every parameter (and with ``include_buffers`` every buffer) on the meta device.

    Parameter subclasses are rebuilt with their attributes; ``_is_hf_initialized`` is carried over
    only where it was set. A parameter that is already on meta is registered as it is, so assigning
    one module's parameter to another (weight tying) keeps one tensor.
    """
    original_register_parameter = nn.Module.register_parameter
    original_register_buffer = nn.Module.register_buffer

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original_register_parameter(module, name, param)
        # A parameter already on meta keeps its identity: that is how tied weights (lm_head = embedding)
        # stay tied when a model ties them after construction.
        if param is None or param.device.type == "meta":
            return
        flag = param.__dict__.get("_is_hf_initialized", _MISSING)
        new = _meta_parameter(module._parameters[name])
        if flag is not _MISSING:
            new._is_hf_initialized = flag
        module._parameters[name] = new

    def register_buffer(module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        original_register_buffer(module, name, tensor, persistent=persistent)
        if tensor is not None:
            module._buffers[name] = module._buffers[name].to(torch.device("meta"))

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    if include_buffers:
        nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original_register_parameter  # type: ignore[method-assign]
        nn.Module.register_buffer = original_register_buffer  # type: ignore[method-assign]


def _transformers_init_module():
    try:
        return importlib.import_module("transformers.initialization")
    except ImportError:
        return importlib.import_module("transformers.modeling_utils")


@contextlib.contextmanager
def skip_random_init() -> Iterator[None]:
    """Skip transformers' random weight init (weights come from a checkpoint right after).

    Restores the previous flag exactly: if the module had no ``_init_weights`` attribute before, it
    has none afterwards (the reference left one set to True).
    """
    module = _transformers_init_module()
    previous = module.__dict__.get("_init_weights", _MISSING)
    module._init_weights = False
    try:
        yield
    finally:
        if previous is _MISSING:
            module.__dict__.pop("_init_weights", None)
        else:
            module._init_weights = previous
