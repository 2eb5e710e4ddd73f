import functools
import gc
import weakref

from torch import nn

import tiny_models as tm
from lightning_automodel.core.forward_signature import (
    VLM_INPUT_KEYS,
    filter_forward_kwargs,
    get_forward_signature,
    supports_logits_to_keep,
    supports_seq_lens,
)


class Explicit(nn.Module):
    def forward(module, input_ids, seq_lens=None, logits_to_keep=0):
        return input_ids


class VarKw(nn.Module):
    def forward(self, input_ids, **kwargs):
        return input_ids


def test_support_flags():
    assert supports_logits_to_keep(Explicit()) and supports_seq_lens(Explicit())
    assert not supports_logits_to_keep(VarKw()) and supports_seq_lens(VarKw())
    assert supports_logits_to_keep(tm.tiny_llama())


def test_filter_drops_receiver_and_unknown_keys():
    kwargs = {"module": 1, "input_ids": 2, "pixel_values": 3}
    out = filter_forward_kwargs(Explicit(), kwargs)
    assert out == {"input_ids": 2} and kwargs == {"module": 1, "input_ids": 2, "pixel_values": 3}
    assert filter_forward_kwargs(VarKw(), kwargs) == kwargs and filter_forward_kwargs(VarKw(), kwargs) is not kwargs


def test_instance_patched_forward_is_not_cached():
    model = Explicit()
    model.forward = lambda x, extra=None: x
    assert list(get_forward_signature(model).parameters) == ["x", "extra"]
    model.forward = functools.partial(lambda x, y: x, y=1)
    assert "x" in get_forward_signature(model).parameters


def test_cache_does_not_pin_models():
    model = Explicit()
    get_forward_signature(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_vlm_keys_match_reference():
    import pytest

    mu = pytest.importorskip("nemo_automodel.components.utils.model_utils")
    assert VLM_INPUT_KEYS == mu.VLM_INPUT_KEYS
