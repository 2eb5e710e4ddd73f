"""Meta builds, buffers computed after materializing, random init per module; the contexts are not thread-safe."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch
from torch import nn

from lightning_automodel._compat.torch import (
    op_schema, own_buffers, own_children, own_parameters, patched_registration, set_own_slots, torch_dispatch_mode,
)
from lightning_automodel._compat.transformers import HF_INITIALIZED_FLAG, init_weights_flag_off, init_weights_hook
from lightning_automodel.core.distributed import copy_local_part, local_index, local_tensor, module_seed

log = logging.getLogger(__name__)

_MISSING = object()
# torchao float8 weight wrappers keep their constructor arguments under private names.
_SUBCLASS_ATTRIBUTE_MAP = {"_linear_mm_config": "linear_mm_config", "_dtype": "dtype", "_precomputed_scale": "precomputed_scale"}


def _meta_parameter(param: nn.Parameter) -> nn.Parameter:
    meta = param.to(torch.device("meta"))
    cls = type(param)
    if cls is nn.Parameter:
        return nn.Parameter(meta, requires_grad=param.requires_grad)
    kwargs = dict(param.__dict__)
    if cls.__name__ == "WeightWithDynamicFloat8CastTensor":
        kwargs = {new: param.__dict__[old] for old, new in _SUBCLASS_ATTRIBUTE_MAP.items() if old in param.__dict__}
    kwargs.pop(HF_INITIALIZED_FLAG, None)
    return cls(meta, **kwargs, requires_grad=param.requires_grad)


@contextlib.contextmanager
def init_empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """Create every parameter (with ``include_buffers`` every buffer) on meta; subclasses keep their attributes."""

    def to_meta_parameter(module: nn.Module, name: str, param: nn.Parameter) -> nn.Parameter:
        # A parameter already on meta keeps its identity: tied weights (lm_head = embedding) stay tied.
        if param.device.type == "meta":
            return param
        flag = param.__dict__.get(HF_INITIALIZED_FLAG, _MISSING)
        new = _meta_parameter(param)
        if flag is not _MISSING:
            setattr(new, HF_INITIALIZED_FLAG, flag)
        return new

    def to_meta_buffer(module: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(torch.device("meta"))

    with patched_registration(to_meta_parameter, to_meta_buffer if include_buffers else None):
        yield


#: Skip transformers' random weight init, restoring the previous flag exactly (no leftover attribute).
skip_random_init = init_weights_flag_off


def _owner_models(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> the nearest ``PreTrainedModel`` at or above it (a VLM's tower inits by the tower's class)."""
    from transformers import PreTrainedModel

    owners: dict[str, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, PreTrainedModel):
            owners[name] = module
        else:
            owners[name] = owners.get(name.rpartition(".")[0], model)
    return owners


def plain_copy(module: nn.Module) -> nn.Module:
    """A shallow copy as its own class (FSDP2's swapped-in subclass cannot ``__new__`` without arguments)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if issubclass(cls, FSDPModule):
        cls = next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
    twin = object.__new__(cls)
    twin.__dict__.update(module.__dict__)
    return twin


def _twin(module: nn.Module, device: str = "meta") -> nn.Module:
    """``module`` with empty parameters on ``device``, meta children (CLIP's init reaching in touches no shard)."""
    twin = plain_copy(module)
    set_own_slots(
        twin,
        parameters={
            n: None if p is None else nn.Parameter(torch.empty(tuple(p.shape), dtype=p.dtype, device=device), requires_grad=p.requires_grad)
            for n, p in own_parameters(module).items()
        },
        buffers={n: _twin_buffer(b, device) for n, b in own_buffers(module).items()},
        children={n: None if c is None else _twin(c) for n, c in own_children(module).items()},
    )
    return twin


def _twin_buffer(buffer: torch.Tensor | None, device: str) -> torch.Tensor | None:
    if buffer is None:
        return None
    if device == "meta":
        return torch.empty(tuple(buffer.shape), dtype=buffer.dtype, device="meta")
    return buffer if buffer.is_meta else buffer.clone()


@torch.no_grad()
def recompute_buffers(model: nn.Module) -> int:
    """Compute every buffer (RoPE ``inv_freq``) with ``_init_weights`` on twins, as ``from_pretrained``; their count."""
    owners = _owner_models(model)
    buffers: dict[int, tuple[str, torch.Tensor]] = {}  # a buffer registered in two modules is one tensor
    for name, buffer in model.named_buffers(remove_duplicate=False):
        buffers.setdefault(id(buffer), (name, buffer))
    for _, buffer in buffers.values():
        mark_unset(buffer)
    for name, module in model.named_modules():
        own = {n: b for n, b in own_buffers(module).items() if b is not None}
        init_fn = init_weights_hook(owners[name])
        if not own or not callable(init_fn):
            continue
        shadow = _twin(module)
        set_own_slots(shadow, buffers=dict(own))
        init_fn(shadow)
        for n, value in own_buffers(shadow).items():
            if value is not None and value is not own[n]:  # assigned rather than written in place
                own[n].copy_(value)
    unset = [name for name, buffer in buffers.values() if _is_unset(buffer)]
    if unset:
        raise ValueError(
            f"buffer(s) {', '.join(unset[:5])}{' ...' if len(unset) > 5 else ''} of {type(model).__name__} are not computed "
            "by the model's _init_weights, which the meta build needs (as transformers' from_pretrained does); update the "
            "model code (remote code written before transformers 5 may compute buffers in __init__ only)."
        )
    return len(buffers)


def mark_unset(tensor: torch.Tensor) -> None:
    """Fill with a value no init computes: NaN, or the smallest integer (booleans cannot be marked)."""
    if tensor.is_floating_point() or tensor.is_complex():
        tensor.fill_(float("nan"))
    elif tensor.dtype != torch.bool:
        tensor.fill_(torch.iinfo(tensor.dtype).min)


def _is_unset(buffer: torch.Tensor) -> bool:
    if not buffer.numel() or buffer.dtype == torch.bool:
        return False
    if buffer.is_floating_point() or buffer.is_complex():
        return bool(buffer.isnan().all())
    return bool((buffer == torch.iinfo(buffer.dtype).min).all())


#: elements per row block (by shape, never world size); small, as an edge block is drawn whole by each rank
#: holding part of it: with 2**20 a 1024 x 1024 projection was drawn whole by every rank.
_BLOCK_ELEMENTS = 2**16
#: in-place ops that overwrite every element without reading it (earlier ops on the tensor do not matter)
_OVERWRITING = {"aten::normal_", "aten::uniform_", "aten::fill_", "aten::zero_", "aten::log_normal_", "aten::exponential_", "aten::bernoulli_"}
#: elementwise in-place ops an init may apply to a whole parameter; replayed on row blocks
_REPLAYABLE = _OVERWRITING | {"aten::erfinv_", "aten::mul_", "aten::add_", "aten::sub_", "aten::div_", "aten::clamp_"}
#: one recorded op: (aten op, its non-tensor arguments, keyword arguments, the row it applies to or None for all)
_Op = tuple[Any, tuple[Any, ...], dict[str, Any], int | None]


def _record_init(twin: nn.Module, run: Callable[[], None]) -> dict[str, list[_Op]] | None:
    """The ops per parameter of ``run`` (an init of the meta ``twin``), scalars computed from the full shape; None when
    not replayable on row blocks (a partial op, a tensor copied in, a device query: ``trunc_normal_`` skips meta)."""
    import inspect

    from torch.overrides import TorchFunctionMode
    TorchDispatchMode = torch_dispatch_mode()  # noqa: N806 - a class

    params = {id(p): n for n, p in own_parameters(twin).items() if p is not None}
    keep_alive: list[torch.Tensor] = []  # so the ids of aliases stay unique while recording
    rows: dict[int, tuple[str, int]] = {}  # ``weight[i]``: one whole row of a parameter
    partial: set[int] = set()
    ops: dict[str, list[_Op]] = {n: [] for n in params.values()}
    state = {"replayable": True}
    device_queries = (inspect.getattr_static(torch.Tensor, "is_meta"), inspect.getattr_static(torch.Tensor, "device"))

    class DeviceQueries(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__self__", None) in device_queries and args and id(args[0]) in params:
                state["replayable"] = False
            return func(*args, **(kwargs or {}))

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            first = args[0] if args else None
            if not isinstance(first, torch.Tensor):
                return out
            schema = op_schema(func)
            if schema.is_mutable:
                if id(first) in params or id(first) in rows:
                    name, row = (params[id(first)], None) if id(first) in params else rows[id(first)]
                    others = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.Tensor)]
                    if schema.name in _REPLAYABLE and not others:
                        rest = {k: v for k, v in kwargs.items() if k != "generator"}
                        ops[name].append((func, tuple(args[1:]), rest, row))
                    else:
                        state["replayable"] = False
                elif id(first) in partial:
                    state["replayable"] = False
            elif (id(first) in params or id(first) in partial) and isinstance(out, torch.Tensor) and schema.returns and schema.returns[0].alias_info:
                keep_alive.append(out)
                whole = id(first) in params and out.shape == first.shape and out.stride() == first.stride()
                whole = whole and out.storage_offset() == first.storage_offset()
                if whole:
                    params[id(out)] = params[id(first)]  # ``.data``, ``.detach()``: the same tensor
                elif id(first) in params and schema.name == "aten::select" and len(args) == 3 and args[1] == 0:
                    rows[id(out)] = (params[id(first)], args[2] % first.shape[0])
                else:
                    partial.add(id(out))
            return out

    with DeviceQueries(), Ops():
        run()
    replayable = state["replayable"] and all(any(_overwrites(op) for op in seq) for seq in ops.values())
    return ops if replayable else None


#: the attribute names every ``nn.Module`` has (hook dicts, slot dicts, ``training``): not part of an init's inputs
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def _value_signature(value: Any) -> Any:
    """A hashable stand-in for an attribute an init may read: scalars (and tuples of them) by value, anything else by identity."""
    if isinstance(value, _SCALARS):
        return (type(value), value)
    if isinstance(value, tuple) and all(isinstance(v, _SCALARS) for v in value):
        return (tuple, value)
    return ("id", id(value))


def _init_signature(module: nn.Module) -> Hashable:
    """What a recorded init can depend on: class, slots' shapes and dtypes, own attributes, children's (recursively)."""
    attributes = tuple(sorted((k, _value_signature(v)) for k, v in vars(module).items() if k not in _MODULE_INTERNALS))
    parameters = tuple(
        (n, None if p is None else (tuple(p.shape), p.dtype, p.requires_grad, type(p))) for n, p in own_parameters(module).items()
    )
    buffers = tuple((n, None if b is None else (tuple(b.shape), b.dtype)) for n, b in own_buffers(module).items())
    children = tuple((n, None if c is None else _init_signature(c)) for n, c in own_children(module).items())
    return (type(module), attributes, parameters, buffers, children)


def _overwrites(op: _Op) -> bool:
    return op[3] is None and op_schema(op[0]).name in _OVERWRITING


def _replay_into(param: torch.Tensor, ops: list[_Op], seed: int) -> None:
    """Replay ``ops`` on the row blocks overlapping this rank's part; block ``b`` draws from seed ``(seed, b)``."""
    local = local_tensor(param)
    if not local.numel():
        return
    index = local_index(param)
    last = max(i for i, op in enumerate(ops) if _overwrites(op))
    ops = ops[last:]  # what came before is overwritten (a constructor's init under the model's own)
    shape = tuple(param.shape)
    if not shape:
        shape, index = (1,), (slice(0, 1),)
        local = local.reshape(1)
    rows = max(1, _BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))
    start, stop = index[0].start, index[0].stop
    whole_rows = all((s.start, s.stop) == (0, n) for s, n in zip(index[1:], shape[1:]))
    in_place = whole_rows and local.device.type == "cpu" and local.is_contiguous()
    for block in range(start // rows, -(-stop // rows)):
        lo, hi = block * rows, min(shape[0], (block + 1) * rows)
        inside = in_place and start <= lo and hi <= stop
        # A block inside the local rows is drawn straight into them (no copy); an edge block is drawn whole.
        values = local[lo - start : hi - start] if inside else torch.empty((hi - lo, *shape[1:]), dtype=param.dtype)
        generator = torch.Generator().manual_seed(module_seed(seed, str(block)))  # no global RNG state to fork
        for func, args, kwargs, row in ops:
            if any(argument.name == "generator" for argument in op_schema(func).arguments):
                kwargs = {**kwargs, "generator": generator}
            if row is None:
                func(values, *args, **kwargs)
            elif lo <= row < hi:
                func(values[row - lo], *args, **kwargs)
        if not inside:
            a, b = max(lo, start), min(hi, stop)
            local[a - start : b - start].copy_(values[(slice(a - lo, b - lo), *index[1:])])


def _run_init(twin: nn.Module, init_fn: Callable[[nn.Module], None] | None) -> None:
    # torch's constructor-time init first (as building the module would), then transformers' own.
    reset = getattr(twin, "reset_parameters", None)
    if callable(reset):
        reset()
    if callable(init_fn):
        init_fn(twin)


@torch.no_grad()
def init_weights_by_module(model: nn.Module, seed: int = 0) -> int:
    """Random-initialize a materialized (sharded) model per module, the same at every world size: a recorded elementwise
    init is replayed on each rank's row blocks, any other runs on a full-size CPU twin. Returns the parameter count."""
    from lightning_automodel.core.naming import canonical_name

    owners = _owner_models(model)
    done: set[int] = set()
    # Recordings per (owner, module signature): a model's layers repeat a few module kinds.
    recordings: dict[tuple[int, Hashable], dict[str, list[_Op]] | None] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        direct = [(n, p) for n, p in own_parameters(module).items() if p is not None and id(p) not in done]
        if not direct:
            continue
        init_fn = init_weights_hook(owners[name])
        seed_of_module = module_seed(seed, canonical_name(name))
        key = (id(owners[name]), _init_signature(module))
        if key not in recordings:
            meta = _twin(module)
            recordings[key] = _record_init(meta, lambda: _run_init(meta, init_fn))
        recorded = recordings[key]
        if recorded is not None:
            for n, p in direct:
                _replay_into(p, recorded[n], module_seed(seed_of_module, n))
        else:
            log.debug("Initializing %s on a full-size twin: its init is not elementwise on whole parameters.", name or type(module).__name__)
            twin = _twin(module, "cpu")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed_of_module)
                _run_init(twin, init_fn)
            for n, p in direct:
                copy_local_part(p, own_parameters(twin)[n])
        done.update(id(p) for _, p in direct)
    return len(done)
