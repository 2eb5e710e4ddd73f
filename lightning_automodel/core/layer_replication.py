"""Build a deep model's repeated layers once: structural copies for the layers a constructor provably treats alike.

Why: ``plan`` builds the model on meta to count and size it, and transformers constructs every decoder
layer in Python (300-500 us per layer on meta). 100,000 layers take about a minute before anything is
planned. Most of those layers are identical, but that has to be proven per model, not assumed:
``layer_types``, ``first_k_dense_replace``, ``mlp_only_layers``, KV sharing and sliding-window patterns
make layer i's structure depend on i, each in its own model code.

How sameness is proven. The first time a layer class is constructed with a given set of non-integer
arguments (the config object, strings...), it is constructed twice: once for real, and once as a
*probe* whose integer arguments are :class:`_TracedInt` objects and whose config lists and tuples log
every subscript by a traced integer. The probe logs each point where an integer argument's value can
reach the constructor's control flow or data:

- a comparison or truth test, with its outcome;
- arithmetic whose result is not an integer (integer results stay traced, so ``(i + 1) % 6 == 0`` is
  one logged comparison of a derived value);
- a subscript of a config sequence, with the element it returned;
- any conversion to a plain value (``__index__``, ``__hash__``, ``str``...), with the value itself.

For a later call with integers ``j``, every logged observation is recomputed from ``j``. When every
outcome equals the probe's, the constructor takes the same path for ``j`` as for the representative,
so its result is a structural copy of the representative, with ``j`` (or the logged derivation of it)
in the attributes that held a traced integer. Otherwise the layer is built for real and probed, up to
``max_variants`` distinct layers per key; beyond that, layers are simply built.

The proof rests on what the probe can see, so every gap falls back to a real build:

- a probe that raises (an operation a traced integer does not support) makes the key non-replicable;
- the probe's structure (module classes, parameter and buffer shapes and dtypes, plain attributes) must
  equal the real representative's, which catches a constructor that branches on ``type(i)``;
- a traced integer may only end up as a direct attribute of a module of the probe (not inside a list,
  closure or other object), so every place that holds ``i`` is known and set for a copy;
- every tensor of the representative must be on the meta device (copies carry no values).

A probe is one more run of the constructor: a constructor with side effects (a global counter) sees
one extra call per probe, at most ``max_variants`` per key and ``4 * max_variants`` per class.

Copies are meant for planning (counting, freezing, casting, LoRA injection, memory estimates), not for
a forward. Modules and parameters are new objects (their ``requires_grad``, ``.data`` and children are
their own) over the representative's meta tensors; ``_parameters``, ``_buffers`` and ``_modules`` are
their own dicts; the empty hook containers are shared and read-only (registering a hook raises
:class:`ReplicaMutationError`); plain attributes are shared; other objects the constructor created
(lists, dicts, helper objects) are shallow copies.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import operator
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

Expr = Callable[[tuple[int, ...]], Any]

# Containers nn.Module.__init__ creates for every module; a copy gets fresh ones.
_MODULE_CONTAINERS = frozenset(vars(nn.Module()).keys()) - {"training"}
_PLAIN_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


@dataclass
class ReplicationStats:
    """How a build went: layers built by their constructor and layers made as copies, per class name."""

    built: dict[str, int] = field(default_factory=dict)
    replicated: dict[str, int] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # class name -> why its layers were all built

    @property
    def total_replicated(self) -> int:
        return sum(self.replicated.values())


# ---- the probe: integers and config sequences that log what the constructor learns from them ----------


@dataclass
class _Observation:
    evaluate: Expr
    outcome: Any


class _Trace:
    def __init__(self) -> None:
        self.observations: list[_Observation] = []
        self.traced: list[_TracedInt] = []
        self.originals: dict[int, Any] = {}  # id(traced config sequence) -> the original sequence

    def observe(self, evaluate: Expr, outcome: Any) -> Any:
        self.observations.append(_Observation(evaluate, outcome))
        return outcome

    def integer(self, value: int, expr: Expr) -> _TracedInt:
        traced = _TracedInt(value, expr, self)
        self.traced.append(traced)
        return traced


def _operand(value: Any) -> tuple[Any, Expr | None]:
    if isinstance(value, _TracedInt):
        return value.value, value.expr
    return value, None


def _combine(op: Callable[[Any, Any], Any], left: Expr | Any, right: Expr | Any, left_traced: bool, right_traced: bool) -> Expr:
    if left_traced and right_traced:
        return lambda vals: op(left(vals), right(vals))
    if left_traced:
        return lambda vals: op(left(vals), right)
    return lambda vals: op(left, right(vals))


def _binary(op: Callable[[Any, Any], Any], *, reflected: bool = False) -> Callable[[_TracedInt, Any], Any]:
    def method(self: _TracedInt, other: Any) -> Any:
        other_value, other_expr = _operand(other)
        if reflected:
            result = op(other_value, self.value)
            expr = _combine(op, other_expr or other_value, self.expr, other_expr is not None, True)
        else:
            result = op(self.value, other_value)
            expr = _combine(op, self.expr, other_expr or other_value, True, other_expr is not None)
        if type(result) is int:
            return self.trace.integer(result, expr)  # stays traced: only what is learnt from it is logged
        return self.trace.observe(expr, result)

    return method


def _unary(op: Callable[[Any], Any], *, keep_traced: bool) -> Callable[[_TracedInt], Any]:
    def method(self: _TracedInt) -> Any:
        result = op(self.value)
        expr = self.expr
        evaluate: Expr = lambda vals: op(expr(vals))  # noqa: E731
        if keep_traced and type(result) is int:
            return self.trace.integer(result, evaluate)
        return self.trace.observe(evaluate, result)

    return method


class _TracedInt:
    """An integer argument in a probe: behaves like its value, logs every outcome its value decides.

    Deliberately not an ``int`` subclass: CPython reads an int subclass's value directly in list
    subscripts, ``range`` and the C parts of torch, so those uses would go unlogged. A non-int goes
    through ``__index__``, which logs the value (the safe, non-replicating outcome).
    """

    __slots__ = ("value", "expr", "trace")

    def __init__(self, value: int, expr: Expr, trace: _Trace) -> None:
        self.value, self.expr, self.trace = value, expr, trace

    __eq__ = _binary(operator.eq)
    __ne__ = _binary(operator.ne)
    __lt__ = _binary(operator.lt)
    __le__ = _binary(operator.le)
    __gt__ = _binary(operator.gt)
    __ge__ = _binary(operator.ge)
    __add__ = _binary(operator.add)
    __radd__ = _binary(operator.add, reflected=True)
    __sub__ = _binary(operator.sub)
    __rsub__ = _binary(operator.sub, reflected=True)
    __mul__ = _binary(operator.mul)
    __rmul__ = _binary(operator.mul, reflected=True)
    __floordiv__ = _binary(operator.floordiv)
    __rfloordiv__ = _binary(operator.floordiv, reflected=True)
    __mod__ = _binary(operator.mod)
    __rmod__ = _binary(operator.mod, reflected=True)
    __truediv__ = _binary(operator.truediv)
    __rtruediv__ = _binary(operator.truediv, reflected=True)
    __pow__ = _binary(operator.pow)
    __rpow__ = _binary(operator.pow, reflected=True)
    __divmod__ = _binary(divmod)
    __rdivmod__ = _binary(divmod, reflected=True)
    __and__ = _binary(operator.and_)
    __rand__ = _binary(operator.and_, reflected=True)
    __or__ = _binary(operator.or_)
    __ror__ = _binary(operator.or_, reflected=True)
    __xor__ = _binary(operator.xor)
    __rxor__ = _binary(operator.xor, reflected=True)
    __lshift__ = _binary(operator.lshift)
    __rshift__ = _binary(operator.rshift)
    __neg__ = _unary(operator.neg, keep_traced=True)
    __pos__ = _unary(operator.pos, keep_traced=True)
    __abs__ = _unary(abs, keep_traced=True)
    __invert__ = _unary(operator.invert, keep_traced=True)
    __bool__ = _unary(bool, keep_traced=False)
    # The value itself leaves the probe: log it, so only the same value matches.
    __index__ = _unary(int, keep_traced=False)
    __int__ = _unary(int, keep_traced=False)
    __float__ = _unary(float, keep_traced=False)
    __hash__ = _unary(hash, keep_traced=False)  # type: ignore[assignment]
    __str__ = _unary(str, keep_traced=False)
    __repr__ = _unary(repr, keep_traced=False)

    def __format__(self, spec: str) -> str:
        expr = self.expr
        return self.trace.observe(lambda vals: format(expr(vals), spec), format(self.value, spec))


class _TracedList(list):
    """A config list during a probe: a subscript by a traced integer logs the element it returns."""

    def __init__(self, items: Iterable[Any], trace: _Trace) -> None:
        super().__init__(items)
        self._trace = trace

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, _TracedInt):
            snapshot, expr = tuple(self), key.expr
            return self._trace.observe(lambda vals: snapshot[expr(vals)], list.__getitem__(self, key.value))
        return list.__getitem__(self, key)


class _TracedTuple(tuple):
    """A config tuple during a probe (see :class:`_TracedList`)."""

    _trace: _Trace

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, _TracedInt):
            snapshot, expr = tuple(self), key.expr
            return self._trace.observe(lambda vals: snapshot[expr(vals)], tuple.__getitem__(self, key.value))
        return tuple.__getitem__(self, key)


@contextlib.contextmanager
def _traced_config_sequences(configs: Iterable[Any], trace: _Trace) -> Iterator[None]:
    """Swap the lists and tuples in each config's ``__dict__`` for logging ones, and back."""
    swapped: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for config in configs:
            attributes = vars(config)
            for name, value in list(attributes.items()):
                if type(value) is list:
                    traced: Any = _TracedList(value, trace)
                elif type(value) is tuple:
                    traced = _TracedTuple(value)
                    traced._trace = trace
                else:
                    continue
                trace.originals[id(traced)] = value
                swapped.append((attributes, name, value))
                attributes[name] = traced
        yield
    finally:
        for attributes, name, value in reversed(swapped):
            attributes[name] = value


def _same_outcome(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    try:
        equal = a == b
    except Exception:  # noqa: BLE001 - an outcome that cannot be compared never matches
        return False
    return equal is True


# ---- structure: what a probe and a real build must agree on ------------------------------------------


def _plain_signature(value: Any, trace: _Trace | None) -> Any:
    if isinstance(value, _TracedInt):
        return ("int", value.value)
    if trace is not None and id(value) in trace.originals:
        value = trace.originals[id(value)]
    if isinstance(value, _PLAIN_TYPES):
        return (type(value).__name__, value)
    return (type(value).__name__,)


def _structure(root: nn.Module, trace: _Trace | None = None) -> list[Any]:
    out: list[Any] = []
    for path, module in root.named_modules(remove_duplicate=False):
        attrs = tuple(sorted((k, _plain_signature(v, trace)) for k, v in vars(module).items() if k not in _MODULE_CONTAINERS))
        out.append((path, type(module), attrs))
        for name, p in module._parameters.items():
            out.append((path, "p", name, None if p is None else (type(p), tuple(p.shape), p.dtype, p.device.type, p.requires_grad)))
        for name, b in module._buffers.items():
            persistent = name not in module._non_persistent_buffers_set
            out.append((path, "b", name, None if b is None else (type(b), tuple(b.shape), b.dtype, b.device.type, persistent)))
    return out


# ---- the template a copy is made from ----------------------------------------------------------------


class _Refusal(Exception):
    """Why a representative cannot be copied (its key's layers are then built for real)."""


class ReplicaMutationError(RuntimeError):
    """Something tried to register a hook or buffer on a layer copy made for planning."""


def _refuse(*_: Any, **__: Any) -> None:
    raise ReplicaMutationError(
        "this layer is a copy made for planning (lightning_automodel.core.layer_replication): it shares its empty "
        "hook containers with the other copies, so hooks and non-persistent buffers cannot be registered on it; "
        "build the model without replication to run it."
    )


class _SharedEmptyHooks(OrderedDict):
    """The empty hook dict every copy shares: 11 of a module's 17 containers, 1.4 KiB per module at 100,000 layers.

    Reading works like any empty OrderedDict; a write raises instead of reaching every copy at once.
    """

    __setitem__ = _refuse
    update = _refuse
    setdefault = _refuse


class _SharedEmptySet(set):
    add = _refuse
    update = _refuse
    discard = _refuse
    remove = _refuse


_SHARED_EMPTY: dict[type, Any] = {OrderedDict: _SharedEmptyHooks(), set: _SharedEmptySet()}


def _fresh_container(value: Any) -> Callable[[], Any]:
    """A factory for a container each copy must own: a new empty one, or a copy of a non-empty one."""
    kind = type(value)
    if not value:
        return kind
    return lambda: kind(value)  # ``copy.copy`` of an OrderedDict goes through __reduce_ex__: 10x slower


_make_subclass = torch.Tensor._make_subclass  # what nn.Parameter.__new__ calls, without the mode's dispatch


@dataclass
class _ModuleRecipe:
    """How to make one module of a copy: its state minus its tensors and children, and what to make fresh."""

    cls: type
    state: dict[str, Any]  # plain attributes and the shared empty containers
    fresh: list[tuple[str, Callable[[], Any]]]  # containers that must be the copy's own
    # A copy's tensors are new tensor objects over the representative's meta tensors: a meta tensor has
    # no data, and torch cannot even ask whether two meta tensors share storage (``is_set_to`` has no
    # meta kernel), so nothing can observe the aliasing; ``torch.empty`` per tensor costs 4x as much.
    parameters: list[tuple[str, torch.Tensor | None, bool]]
    buffers: list[tuple[str, torch.Tensor | None]]
    children: list[tuple[str, int | None]]


@dataclass
class _Template:
    """What a copy of a representative needs: its modules' recipes, which attributes hold the integers, what to copy."""

    recipes: list[_ModuleRecipe]  # the representative's modules, root first
    integer_attributes: list[tuple[int, str, Expr]]  # (module position, attribute, derivation from the integers)
    copied_attributes: list[tuple[int, str]]  # objects the constructor created: each copy gets a shallow copy
    module_attributes: list[tuple[int, str, int]]  # unregistered references to a module of the layer

    @classmethod
    def of(cls, representative: nn.Module, integer_attributes: list[tuple[int, str, Expr]],
           copied_attributes: list[tuple[int, str]], module_attributes: list[tuple[int, str, int]]) -> _Template:
        modules = list(representative.modules())
        position = {id(m): i for i, m in enumerate(modules)}
        recipes = []
        for module in modules:
            state, fresh = {}, []
            for key, value in vars(module).items():
                if key in ("_parameters", "_buffers", "_modules"):
                    continue
                if key in _MODULE_CONTAINERS:
                    if value is None:
                        state[key] = None
                    elif not value and type(value) in _SHARED_EMPTY:
                        state[key] = _SHARED_EMPTY[type(value)]
                    else:
                        fresh.append((key, _fresh_container(value)))
                else:
                    state[key] = value
            recipes.append(_ModuleRecipe(
                cls=type(module),
                state=state,
                fresh=fresh,
                parameters=[(k, None, False) if p is None else (k, p.data, p.requires_grad) for k, p in module._parameters.items()],
                buffers=[(k, None if b is None else b.detach()) for k, b in module._buffers.items()],
                children=[(k, None if c is None else position[id(c)]) for k, c in module._modules.items()],
            ))
        return cls(recipes, integer_attributes, copied_attributes, module_attributes)

    def instantiate(self, target: nn.Module, vals: tuple[int, ...]) -> None:
        """Make ``target`` (an empty instance of the representative's class) a copy of the representative."""
        recipes = self.recipes
        copies: list[nn.Module] = [target]
        copies.extend(object.__new__(recipe.cls) for recipe in recipes[1:])
        parameter, tensor = nn.Parameter, torch.Tensor
        for recipe, new in zip(recipes, copies):
            state = recipe.state.copy()
            for name, factory in recipe.fresh:
                state[name] = factory()
            params = {}
            for k, base, requires_grad in recipe.parameters:
                params[k] = None if base is None else _make_subclass(parameter, base, requires_grad)
            state["_parameters"] = params
            buffers = {}
            for k, base in recipe.buffers:
                buffers[k] = None if base is None else _make_subclass(tensor, base, False)
            state["_buffers"] = buffers
            state["_modules"] = {k: None if i is None else copies[i] for k, i in recipe.children}
            object.__setattr__(new, "__dict__", state)  # nn.Module.__setattr__ would type-check it: 30% of a copy
        for index, name, expr in self.integer_attributes:
            copies[index].__dict__[name] = expr(vals)
        for index, name in self.copied_attributes:
            copies[index].__dict__[name] = copy.copy(copies[index].__dict__[name])
        for index, name, target_index in self.module_attributes:
            copies[index].__dict__[name] = copies[target_index]


def _make_template(representative: nn.Module, probe: nn.Module, trace: _Trace) -> _Template:
    if _structure(representative) != _structure(probe, trace):
        raise _Refusal("the probe built a different structure than the real constructor")
    modules = list(representative.modules())
    probe_modules = list(probe.modules())
    if len(modules) != len(probe_modules):
        raise _Refusal("a module is registered twice")
    position = {id(m): i for i, m in enumerate(modules)}
    if any(id(m) in position for m in probe_modules):
        raise _Refusal("a module outside the layer is registered inside it")
    for module in modules:
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is not None and (tensor.device.type != "meta" or type(tensor) not in (torch.Tensor, nn.Parameter)):
                raise _Refusal("a tensor is not a plain meta tensor (copies carry no values)")
    integer_attributes: list[tuple[int, str, Expr]] = []
    copied: list[tuple[int, str]] = []
    module_refs: list[tuple[int, str, int]] = []
    for index, (real, probed) in enumerate(zip(modules, probe_modules)):
        for name, value in vars(probed).items():
            if name in _MODULE_CONTAINERS:
                continue
            real_value = vars(real)[name]
            if isinstance(value, _TracedInt):
                integer_attributes.append((index, name, value.expr))
            elif isinstance(real_value, nn.Module):
                if id(real_value) in position:
                    module_refs.append((index, name, position[id(real_value)]))
                elif real_value is not value:
                    raise _Refusal(f"attribute {name!r} holds a module created outside the layer's tree")
            elif isinstance(real_value, torch.Tensor):
                if real_value is not value:
                    raise _Refusal(f"attribute {name!r} holds an unregistered tensor")
            elif isinstance(real_value, _PLAIN_TYPES) or real_value is trace.originals.get(id(value), value):
                continue  # plain values, and objects that existed before the constructor ran (the config...)
            else:
                copied.append((index, name))
    for index, name in copied:
        try:
            copy.copy(vars(modules[index])[name])
        except Exception as exc:  # noqa: BLE001 - an object that cannot be copied cannot be in a copy
            raise _Refusal(f"attribute {name!r} cannot be copied ({type(exc).__name__})") from None
    _check_integers_held_only_as_attributes(trace, probe_modules, integer_attributes)
    return _Template.of(representative, integer_attributes, copied, module_refs)


def _check_integers_held_only_as_attributes(
    trace: _Trace, probe_modules: list[nn.Module], integer_attributes: list[tuple[int, str, Expr]]
) -> None:
    """Refuse when a traced integer is referenced by anything but a recorded module attribute.

    One ``gc.get_referrers`` scan for all of them: a list, tuple, closure cell or helper object holding
    one means a copy would keep the representative's integer where the constructor would have put j.
    """
    if not trace.traced:
        return
    allowed = {id(vars(probe_modules[index])) for index, _, _ in integer_attributes}
    here = sys._getframe()
    for referrer in gc.get_referrers(*trace.traced):
        if referrer is trace.traced or referrer is here:
            continue
        if id(referrer) in allowed:
            continue  # a probe module's __dict__: every traced integer in it is a recorded attribute
        raise _Refusal(f"an integer argument is kept in a {type(referrer).__name__}, not only as a module attribute")


# ---- the interception --------------------------------------------------------------------------------


@dataclass
class _Variant:
    observations: list[_Observation]
    template: _Template

    def matches(self, vals: tuple[int, ...]) -> bool:
        for observation in self.observations:
            try:
                outcome = observation.evaluate(vals)
            except Exception:  # noqa: BLE001 - a derivation that fails for j is a different path
                return False
            if not _same_outcome(outcome, observation.outcome):
                return False
        return True


@dataclass
class _Entry:
    arguments: tuple[Any, ...]  # keeps the objects in the key alive, so their ids cannot be reused
    variants: list[_Variant] = field(default_factory=list)
    probes: int = 0
    refused: str | None = None


def _split_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, tuple[int, ...], list[tuple[Any, int]]]:
    """The call's key (everything but integer values), its integers, and where they sit."""
    key: list[Any] = []
    vals: list[int] = []
    slots: list[tuple[Any, int]] = []
    for where, value in [*enumerate(args), *sorted(kwargs.items())]:
        if type(value) is int:
            key.append((where, "int"))
            slots.append((where, len(vals)))
            vals.append(value)
        elif isinstance(value, (str, float, bool, type(None))):
            key.append((where, type(value), value))
        else:
            key.append((where, id(value)))
    return tuple(key), tuple(vals), slots


class _Interceptor:
    def __init__(self, max_variants: int, stats: ReplicationStats) -> None:
        self.max_variants = max_variants
        self.stats = stats
        self.entries: dict[tuple[type, Any], _Entry] = {}
        self.depth = 0
        # A model that passes every layer its own config object makes a new key per layer: bound the
        # probes per class too, or such a model would pay two constructions per layer.
        self.probes_by_class: dict[type, int] = {}

    def wrap(self, cls: type, original: Callable[..., None]) -> Callable[..., None]:
        interceptor = self

        def __init__(self: nn.Module, *args: Any, **kwargs: Any) -> None:  # noqa: N807
            if interceptor.depth or type(self) is not cls:
                original(self, *args, **kwargs)  # nested or a subclass: not ours to decide
                return
            interceptor.construct(cls, original, self, args, kwargs)

        __init__.__wrapped__ = original  # type: ignore[attr-defined]
        return __init__

    def construct(self, cls: type, original: Callable[..., None], target: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        key, vals, slots = _split_arguments(args, kwargs)
        entry = self.entries.get((cls, key))
        if entry is None:
            entry = self.entries[(cls, key)] = _Entry(arguments=(args, kwargs))
        name = cls.__name__
        # Without integer arguments there is nothing to log: the probe is a second construction with the
        # same arguments, and any difference (a global counter, randomness in the structure) fails the
        # structure check.
        for variant in entry.variants:
            if variant.matches(vals):
                variant.template.instantiate(target, vals)
                self.stats.replicated[name] = self.stats.replicated.get(name, 0) + 1
                return
        self.depth += 1
        try:
            original(target, *args, **kwargs)
            self.stats.built[name] = self.stats.built.get(name, 0) + 1
            probed = self.probes_by_class.get(cls, 0)
            if entry.refused is None and entry.probes < self.max_variants and probed < 4 * self.max_variants:
                entry.probes += 1
                self.probes_by_class[cls] = probed + 1
                self._probe(cls, original, target, args, kwargs, vals, slots, entry)
        finally:
            self.depth -= 1

    def _probe(
        self, cls: type, original: Callable[..., None], representative: nn.Module, args: tuple[Any, ...],
        kwargs: dict[str, Any], vals: tuple[int, ...], slots: list[tuple[Any, int]], entry: _Entry,
    ) -> None:
        trace = _Trace()
        configs = [a for a in (*args, *kwargs.values()) if _is_config(a)]
        probe = object.__new__(cls)
        try:
            with _traced_config_sequences(configs, trace):
                _call_traced(original, probe, args, kwargs, vals, slots, trace)
            template = _make_template(representative, probe, trace)
        except _Refusal as exc:
            entry.refused = str(exc)
        except Exception as exc:  # noqa: BLE001 - the probe did something a traced integer cannot: build for real
            entry.refused = f"the constructor uses its integer argument in a way the probe cannot follow ({type(exc).__name__}: {exc})"
        else:
            entry.variants.append(_Variant(trace.observations, template))
            return
        self.stats.refused[cls.__name__] = entry.refused
        log.debug("layer replication: every %s is built (%s).", cls.__name__, entry.refused)


def _call_traced(
    original: Callable[..., None], probe: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
    vals: tuple[int, ...], slots: list[tuple[Any, int]], trace: _Trace,
) -> None:
    """Run the constructor with traced integers; the traced arguments die with this frame."""
    traced_args, traced_kwargs = list(args), dict(kwargs)
    for where, slot in slots:
        traced = trace.integer(vals[slot], lambda v, slot=slot: v[slot])
        if isinstance(where, int):
            traced_args[where] = traced
        else:
            traced_kwargs[where] = traced
    original(probe, *traced_args, **traced_kwargs)


def _is_config(value: Any) -> bool:
    from transformers import PretrainedConfig

    return isinstance(value, PretrainedConfig)


@contextlib.contextmanager
def replicate_identical_layers(
    layer_classes: Iterable[type], *, max_variants: int = 16, stats: ReplicationStats | None = None
) -> Iterator[ReplicationStats]:
    """While active, a construction of one of ``layer_classes`` that provably repeats an earlier one is a copy.

    See the module docstring for the proof and its limits. Meant for models built under
    ``torch.device("meta")``: a representative holding real tensors is never copied.

    Yields:
        ``stats`` (a new :class:`ReplicationStats` when not given), filled as the model is built.
    """
    stats = stats if stats is not None else ReplicationStats()
    interceptor = _Interceptor(max_variants, stats)
    patched: list[tuple[type, Any]] = []
    try:
        for cls in dict.fromkeys(layer_classes):
            own = cls.__dict__.get("__init__")
            patched.append((cls, own))
            cls.__init__ = interceptor.wrap(cls, cls.__init__)  # type: ignore[misc]
        yield stats
    finally:
        for cls, own in reversed(patched):
            if own is None:
                del cls.__init__  # type: ignore[misc]
            else:
                cls.__init__ = own  # type: ignore[misc]
