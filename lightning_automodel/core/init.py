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


def _owner_models(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> the nearest ``PreTrainedModel`` at or above it (whose ``_init_weights`` applies).

    transformers' ``initialize_weights`` dispatches the same way: a vision tower inside a VLM is
    initialized by the tower's own class.
    """
    from transformers import PreTrainedModel

    owners: dict[str, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, PreTrainedModel):
            owners[name] = module
        else:
            parent = name.rpartition(".")[0] if "." in name else ""
            owners[name] = owners.get(parent, model)
    return owners


def plain_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` as an instance of its own class (FSDP2 swaps in a subclass whose
    ``__new__`` cannot be called without constructor arguments)."""
    cls = type(module)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        FSDPModule = ()  # noqa: N806
    if FSDPModule and issubclass(cls, FSDPModule):
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
    twin = object.__new__(cls)
    twin.__dict__.update(module.__dict__)
    return twin


def _meta_shadow(module: nn.Module) -> nn.Module:
    shadow = plain_copy(module)
    shadow._parameters = {
        n: (nn.Parameter(torch.empty(tuple(p.shape), dtype=p.dtype, device="meta"), requires_grad=p.requires_grad) if p is not None else None)
        for n, p in module._parameters.items()
    }
    shadow._buffers = {n: (torch.empty(tuple(b.shape), dtype=b.dtype, device="meta") if b is not None else None) for n, b in module._buffers.items()}
    shadow._modules = {n: _meta_shadow(c) if c is not None else None for n, c in module._modules.items()}
    return shadow


def _module_seed(seed: int, name: str) -> int:
    import hashlib

    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@torch.no_grad()
def init_weights_by_module(model: nn.Module, seed: int = 0) -> int:
    """Random-initialize a materialized (possibly FSDP2-sharded) model one module at a time.

    For each module that holds parameters directly, a private CPU twin of just that module is built at
    full size, initialized by the model's own ``_init_weights`` (the nearest ``PreTrainedModel``'s, as
    ``initialize_weights`` dispatches), and each parameter's local shard is copied out. Peak extra memory
    is one module's parameters (the largest tensor for almost every model); no rank builds the model.

    Each module's generator is seeded from ``seed`` and the module's name, so the result is identical on
    every rank and at every world size (one device, DDP or FSDP2 start from the same weights). Every
    module initializes its own parameters: where a model's ``_init_weights`` of a parent also re-inits
    a child's parameters (CLIP's embeddings), the child keeps its own type's init, still a proper one.
    Returns the number of parameters initialized.
    """
    from lightning_automodel.core.naming import canonical_name
    from lightning_automodel.core.sharded_load import copy_local_part

    owners = _owner_models(model)
    done: set[int] = set()
    count = 0
    for name, module in model.named_modules(remove_duplicate=False):
        direct = [(n, p) for n, p in module._parameters.items() if p is not None and id(p) not in done]
        if not direct:
            continue
        init_fn = getattr(owners[name], "_init_weights", None)
        twin = plain_copy(module)
        # Children get their own twins; here they are meta shadows, so an init that reaches into them
        # (CLIP's embeddings init their patch embedding) is a no-op instead of touching real shards.
        twin._modules = {n: _meta_shadow(c) if c is not None else None for n, c in module._modules.items()}
        twin._parameters = {}
        twin._buffers = {n: (b.clone() if b is not None and not b.is_meta else b) for n, b in module._buffers.items()}
        for n, p in module._parameters.items():
            if p is None:
                twin._parameters[n] = None
                continue
            full = torch.empty(tuple(p.shape), dtype=p.dtype, device="cpu")
            twin._parameters[n] = nn.Parameter(full, requires_grad=p.requires_grad)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_module_seed(seed, canonical_name(name)))
            # torch's constructor-time init first (as building the module would), then transformers' own.
            reset = getattr(twin, "reset_parameters", None)
            if callable(reset):
                reset()
            if callable(init_fn):
                init_fn(twin)
        for n, p in direct:
            copy_local_part(p, twin._parameters[n])
            done.add(id(p))
            count += 1
    return count
