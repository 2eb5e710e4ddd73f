"""Canonical names: wrapper components vanish wherever they sit, so selectors survive any wrapping."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

import tiny_models as tm
from lightning_automodel.core.naming import (
    WRAPPER_PREFIXES,
    canonical_name,
    canonical_named_modules,
    get_module_by_canonical_name,
    unique_named_parameters,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("model.layers.0.mlp.weight", "model.layers.0.mlp.weight"),
        ("model.layers.0._checkpoint_wrapped_module.mlp.weight", "model.layers.0.mlp.weight"),
        ("_orig_mod.model.norm.weight", "model.norm.weight"),
        ("_fsdp_wrapped_module._orig_mod.lm_head.weight", "lm_head.weight"),
        ("model.layers.0._orig_mod", "model.layers.0"),
        ("_orig_mod", ""),
        ("model._private_thing.weight", "model._private_thing.weight"),  # only exact wrapper components go
        ("model.foo_orig_mod.weight", "model.foo_orig_mod.weight"),
        ("model.x_checkpoint_wrapped_module.y", "model.x_checkpoint_wrapped_module.y"),
    ],
)
def test_canonical_name(raw, expected):
    assert canonical_name(raw) == expected


_component = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(_component, min_size=1, max_size=6),
    wrappers=st.lists(st.tuples(st.integers(0, 6), st.sampled_from(WRAPPER_PREFIXES)), max_size=4),
)
def test_inserting_wrappers_anywhere_is_undone(parts, wrappers):
    """Property: a clean dotted name with wrapper components inserted anywhere canonicalizes back."""
    components = list(parts)
    for position, wrapper in wrappers:
        components.insert(min(position, len(components)), wrapper[:-1])
    clean = ".".join(parts)
    assert canonical_name(".".join(components)) == clean
    assert canonical_name(clean) == clean  # idempotent on clean names


def _wrapped_llama():
    model = tm.tiny_llama()
    model.model.layers[1] = checkpoint_wrapper(model.model.layers[1])
    return model


def test_canonical_parameters_equal_the_unwrapped_model():
    plain = [n for n, _ in tm.tiny_llama().named_parameters()]
    wrapped = _wrapped_llama()
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())
    assert [n for n, _ in unique_named_parameters(wrapped)] == plain


def test_get_module_by_canonical_name_returns_the_innermost_module():
    model = _wrapped_llama()
    inner = model.model.layers[1]._checkpoint_wrapped_module
    assert get_module_by_canonical_name(model, "model.layers.1") is inner
    assert get_module_by_canonical_name(model, "model.layers.1.mlp") is inner.mlp
    assert get_module_by_canonical_name(model, "model.nope") is None
    names = [n for n, _ in canonical_named_modules(model)]
    assert names.count("model.layers.1") == 2  # the wrapper and the wrapped module share the name


def test_the_reference_facade_returns_the_outermost_module_from_the_same_rule():
    from lightning_automodel.checkpoint_utils import _get_module_by_normalized_name

    model = _wrapped_llama()
    wrapper = model.model.layers[1]
    assert _get_module_by_normalized_name(model, "model.layers.1") is wrapper
    assert get_module_by_canonical_name(model, "model.layers.1", outermost=True) is wrapper
    assert get_module_by_canonical_name(model, "model.layers.1") is wrapper._checkpoint_wrapped_module
    assert _get_module_by_normalized_name(model, "") is model
    assert _get_module_by_normalized_name(model, "model.nope") is None
    ref = pytest.importorskip("nemo_automodel.shared.tied_weights")
    assert ref._get_module_by_normalized_name(model, "model.layers.1") is wrapper


def test_the_reference_facade_finds_a_module_registered_twice_under_its_first_name_only():
    from lightning_automodel.checkpoint_utils import _get_module_by_normalized_name

    model = tm.tiny_llama()
    model.alias = model.model.norm  # the same module under a second name
    assert _get_module_by_normalized_name(model, "model.norm") is model.model.norm
    assert _get_module_by_normalized_name(model, "alias") is None
    ref = pytest.importorskip("nemo_automodel.shared.tied_weights")
    assert ref._get_module_by_normalized_name(model, "alias") is None


def test_unique_named_parameters_lists_a_tied_weight_once_under_its_first_name():
    model = tm.tiny_gemma3()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    names = [n for n, _ in unique_named_parameters(model)]
    expected = []
    seen = set()
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            expected.append(n)
    assert names == expected and "lm_head.weight" not in names


def test_compiled_module_names_are_canonical():
    model = nn.Sequential(nn.Linear(2, 2))
    compiled = nn.Module()
    compiled._orig_mod = model  # what torch.compile's OptimizedModule registers
    assert [n for n, _ in unique_named_parameters(compiled)] == ["0.weight", "0.bias"]
    assert torch.equal(get_module_by_canonical_name(compiled, "0").weight, model[0].weight)


def test_unique_named_parameters_lists_a_tied_weight_once():
    from torch import nn

    from lightning_automodel.core.naming import unique_named_parameters

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].weight = model[0].weight  # tied: listed once, under its first name
    assert [n for n, _ in unique_named_parameters(model)] == ["0.weight", "0.bias", "1.bias"]
