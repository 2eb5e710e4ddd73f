import pytest
import torch
from torch import nn

from lightning_automodel._compat.transformers import _init_module as _transformers_init_module
from lightning_automodel.core.init import init_empty_weights, skip_random_init


def test_init_empty_weights_meta_and_restore_on_error():
    original = nn.Module.register_parameter
    with init_empty_weights():
        layer = nn.Linear(1000, 1000)
        buf_module = nn.BatchNorm1d(4)
    assert layer.weight.is_meta and buf_module.running_mean.device.type == "cpu"
    assert nn.Module.register_parameter is original
    with pytest.raises(RuntimeError):
        with init_empty_weights(include_buffers=True):
            raise RuntimeError("boom")
    assert nn.Module.register_parameter is original and nn.Module.register_buffer is not None
    with init_empty_weights(include_buffers=True):
        bn = nn.BatchNorm1d(4)
    assert bn.running_mean.is_meta
    assert not nn.Linear(2, 2).weight.is_meta


def test_init_empty_keeps_requires_grad_and_hf_flag():
    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            p = nn.Parameter(torch.ones(2), requires_grad=False)
            p._is_hf_initialized = True
            self.p = p
            self.q = nn.Parameter(torch.ones(2))

    with init_empty_weights():
        m = Flagged()
    assert m.p.is_meta and not m.p.requires_grad and m.p._is_hf_initialized is True
    assert not hasattr(m.q, "_is_hf_initialized")


def test_skip_random_init_restores_exactly():
    module = _transformers_init_module()
    had = "_init_weights" in module.__dict__
    previous = module.__dict__.get("_init_weights")
    with pytest.raises(ValueError):
        with skip_random_init():
            assert module._init_weights is False
            raise ValueError
    assert ("_init_weights" in module.__dict__) == had
    assert module.__dict__.get("_init_weights") == previous
    module.__dict__.pop("_init_weights", None)
    with skip_random_init():
        pass
    assert "_init_weights" not in module.__dict__  # the reference leaves one set to True
    if had:
        module._init_weights = previous


def test_tied_weights_stay_tied_on_meta():
    import tiny_models as tm

    with init_empty_weights():
        model = tm.build(tm.tiny_config("gemma3_text"))
    assert model.lm_head.weight.is_meta
    assert model.lm_head.weight is model.model.embed_tokens.weight
