"""Private torch names the package needs (checked on torch 2.13.0). Nothing here imports torch.distributed
eagerly: a CPU-only build without it still imports the package."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

# Private globals of torch's DCP ``.metadata`` pickle that the restricted unpickler must allow by name
# (no public loader of DCP metadata refuses arbitrary globals).
DCP_METADATA_PRIVATE_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({"_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
}


def apply_to_tensors(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``module._apply(fn)`` on every parameter, gradient and buffer. Why private: casting only some tensors, keeping
    ``Parameter`` objects, with FSDP2's ``reset_sharded_param`` after it, has no public entry point."""
    module._apply(fn)


def own_parameters(module: nn.Module) -> dict[str, nn.Parameter | None]:
    """A copy of the module's own parameter slots, ``None`` entries included (``bias=None``).
    Why private: ``named_parameters(recurse=False)`` drops ``None`` slots, which a copy of the module must keep."""
    return dict(module._parameters)


def own_buffers(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """A copy of the module's own buffer slots, ``None`` entries included (why: as :func:`own_parameters`)."""
    return dict(module._buffers)


def own_children(module: nn.Module) -> dict[str, nn.Module | None]:
    """A copy of the module's child slots. Why private: ``named_children`` drops ``None`` and de-duplicates by identity."""
    return dict(module._modules)


def non_persistent_buffer_names(module: nn.Module) -> set[str]:
    """The module's own ``persistent=False`` buffers. Why private: torch has no public query but a whole ``state_dict``."""
    return set(module._non_persistent_buffers_set)


def set_own_slots(
    module: nn.Module,
    *,
    parameters: dict[str, nn.Parameter | None] | None = None,
    buffers: dict[str, torch.Tensor | None] | None = None,
    children: dict[str, nn.Module | None] | None = None,
) -> None:
    """Give ``module`` new parameter / buffer / child dicts. Why private: a shallow copy shares them with the
    original (``register_*`` would write into them); replacing them is the only way without the constructor."""
    if parameters is not None:
        module._parameters = parameters
    if buffers is not None:
        module._buffers = buffers
    if children is not None:
        module._modules = children


@contextlib.contextmanager
def patched_registration(
    on_parameter: Callable[[nn.Module, str, nn.Parameter], nn.Parameter] | None = None,
    on_buffer: Callable[[nn.Module, str, torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[None]:
    """While active, ``register_parameter`` / ``register_buffer`` store ``on_parameter(module, name, param)`` /
    ``on_buffer`` of what they got; not thread-safe. Why a class-level patch: constructors register before any
    hook sees them; ``torch.device("meta")`` moves every tensor (some kept on purpose) and loses tied identity."""
    original_parameter = nn.Module.register_parameter
    original_buffer = nn.Module.register_buffer

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original_parameter(module, name, param)
        if param is not None and on_parameter is not None:
            module._parameters[name] = on_parameter(module, name, module._parameters[name])

    def register_buffer(module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        original_buffer(module, name, tensor, persistent=persistent)
        if tensor is not None and on_buffer is not None:
            module._buffers[name] = on_buffer(module, name, module._buffers[name])

    if on_parameter is not None:
        nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    if on_buffer is not None:
        nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original_parameter  # type: ignore[method-assign]
        nn.Module.register_buffer = original_buffer  # type: ignore[method-assign]


def op_schema(func: Any) -> Any:
    """An aten ``OpOverload``'s ``torch.FunctionSchema``. Why private: exposed only as ``func._schema``."""
    return func._schema


def torch_dispatch_mode() -> type:
    """``TorchDispatchMode``: documented but exported only privately; ``TorchFunctionMode`` misses aten ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def local_shape_and_offset(tensor: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A DTensor's local shard shape and global offset on this rank. Why private: DTensor has no public "where is my
    shard" query (transformers' shard-on-read uses the same function)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(shape), tuple(offset)


def checkpoint_wrapper() -> Callable[..., nn.Module]:
    """torch's activation-checkpoint module wrapper (FSDP2, torchtitan). Why private: shipped only from
    ``torch.distributed.algorithms._checkpoint``; ``torch.utils.checkpoint`` is a function, not a wrapper."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper as wrapper

    return wrapper
