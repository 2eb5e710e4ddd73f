"""Private torch names the package needs (checked on torch 2.13.0).

Nothing here imports torch.distributed eagerly: a CPU-only build without it still imports the package.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

#: DCP metadata globals that torch's own ``.metadata`` pickle references, by module. The restricted
#: unpickler of a checkpoint's metadata must allow them by name, and three are private to torch:
#: ``_StorageInfo`` (a file's byte range), ``_MEM_FORMAT_ENCODING`` (tensor memory format) and
#: ``torch.serialization._get_layout`` (``torch.strided`` by name). No public loader of DCP metadata
#: refuses arbitrary globals (``FileSystemReader.read_metadata`` unpickles everything).
DCP_METADATA_PRIVATE_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({"_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
}


def apply_to_tensors(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``module._apply(fn)``: replace every parameter, gradient and buffer of the module tree by ``fn`` of it.

    Why private: ``Module.to``/``half``/``float`` are the public faces of ``_apply`` but cast every
    floating tensor; a cast of some tensors only (by dtype, keeping ``Parameter`` objects and gradients,
    one tensor at a time, with FSDP2's ``reset_sharded_param`` after it) has no public entry point.
    """
    module._apply(fn)


def own_parameters(module: nn.Module) -> dict[str, nn.Parameter | None]:
    """The module's own parameter slots, ``None`` entries included (``bias=None``), in registration order.

    Why private: ``named_parameters(recurse=False)`` drops ``None`` slots, which a copy of the module
    must keep (``module.bias`` is ``None``, not missing). Returns a new dict.
    """
    return dict(module._parameters)


def own_buffers(module: nn.Module) -> dict[str, torch.Tensor | None]:
    """The module's own buffer slots, ``None`` entries included (see :func:`own_parameters`). A new dict."""
    return dict(module._buffers)


def own_children(module: nn.Module) -> dict[str, nn.Module | None]:
    """The module's child slots, ``None`` entries and a child registered under two names included.

    Why private: ``named_children`` drops both (it de-duplicates by identity). A new dict.
    """
    return dict(module._modules)


def non_persistent_buffer_names(module: nn.Module) -> set[str]:
    """Names of the module's own buffers registered with ``persistent=False`` (not in its state dict).

    Why private: torch has no public query; ``state_dict`` tells only after building one for the whole subtree.
    """
    return set(module._non_persistent_buffers_set)


def set_own_slots(
    module: nn.Module,
    *,
    parameters: dict[str, nn.Parameter | None] | None = None,
    buffers: dict[str, torch.Tensor | None] | None = None,
    children: dict[str, nn.Module | None] | None = None,
) -> None:
    """Give ``module`` new parameter / buffer / child dicts (each one given), replacing the dict objects.

    Why private: a shallow copy of a module shares these dicts with the original; ``register_*`` and
    ``setattr`` would write into the shared dict (changing the original). Replacing the dicts is the
    only way to give the copy its own slots without running the module's constructor.
    """
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
    """While active, every ``Module.register_parameter`` / ``register_buffer`` (the ones ``setattr`` goes
    through) stores ``on_parameter(module, name, param)`` / ``on_buffer(...)`` instead of what it was given.

    Why a class-level patch: a module's constructor creates and registers its tensors before any hook
    could see them; ``with torch.device("meta")`` moves every tensor (including the ones a model keeps
    on purpose, and loses the identity of a tied weight). Not thread-safe; restored on exit and on exceptions.
    """
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
    """The ``torch.FunctionSchema`` of an aten ``OpOverload`` (``func._schema``): name, mutability, arguments.

    Why private: a ``__torch_dispatch__`` handler receives ``OpOverload`` objects whose schema is only
    exposed as ``_schema`` (``torch.ops`` documents no public accessor).
    """
    return func._schema


def torch_dispatch_mode() -> type:
    """``torch.utils._python_dispatch.TorchDispatchMode``: the base class of an aten-level tracing mode.

    Why private: torch documents ``__torch_dispatch__`` modes ("Extending PyTorch") but exports the base
    class only from this private module; ``torch.overrides.TorchFunctionMode`` sees Python calls, not
    the aten ops an init decomposes into.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def local_shape_and_offset(tensor: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A DTensor's local shard shape and its offset in the global tensor, on this rank.

    Why private: ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``; DTensor has
    no public "where is my shard" query (transformers' shard-on-read uses the same function).
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(shape), tuple(offset)


def checkpoint_wrapper() -> Callable[..., nn.Module]:
    """``torch.distributed.algorithms._checkpoint.checkpoint_wrapper.checkpoint_wrapper``.

    Why private: the module wrapper that runs a layer under ``torch.utils.checkpoint`` and that FSDP2
    and torchtitan wrap decoder layers with; torch ships it only from this private package
    (``torch.utils.checkpoint`` is the function, not a module wrapper whose names ``_checkpoint_wrapped_module`` the
    package's naming rules strip).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper as wrapper

    return wrapper
