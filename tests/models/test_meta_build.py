"""One meta build for fit, plan and export (issue 18 item 5, issue 20): no CPU allocation per parameter,
buffers computed again after materialization, equal to a plain transformers build's."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode, resolve_name

import tiny_models as tm
from lightning_automodel.core.sharded_load import CheckpointReader, load_checkpoint_into, plan_checkpoint_load
from lightning_automodel.core.model_build import build_meta_model, materialize

#: any single host allocation above this during a meta build is a failure
_LIMIT_BYTES = 2**20


class HostAllocations(TorchFunctionMode):
    """Refuses, before it happens, a large ``torch.empty`` off the meta device; counts other host tensors made.

    ``torch.device("meta")`` is a mode too: entered inside this one, it has already put its device in
    the arguments by the time they reach here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.host_bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty:
            size = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
            device = torch.device(kwargs.get("device") or torch.get_default_device())
            nbytes = torch.Size(size).numel() * (kwargs.get("dtype") or torch.get_default_dtype()).itemsize
            if device.type != "meta" and nbytes > _LIMIT_BYTES:
                raise AssertionError(f"the meta build allocated {nbytes / 2**30:.1f} GiB on {device}")
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and not out.is_meta and resolve_name(func) != "torch.Tensor.__get__":
            self.host_bytes += out.numel() * out.element_size()
        return out


def test_a_256k_by_32k_embedding_builds_without_allocating():
    # The old fit build (a patched register_parameter) created each parameter on the CPU first: this
    # 256000 x 32768 embedding (33.5 GB) failed with "can't allocate memory".
    config = tm.tiny_config("llama", vocab_size=256_000, hidden_size=32_768, num_attention_heads=256, num_key_value_heads=8,
                            head_dim=128, intermediate_size=64, num_hidden_layers=1)
    with HostAllocations() as allocations:
        model = build_meta_model(config, "causal_lm")
    assert model.model.embed_tokens.weight.shape == (256_000, 32_768)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert allocations.host_bytes < _LIMIT_BYTES


def _reference_and_loaded(builder, tmp_path):
    reference = builder()
    reference.save_pretrained(tmp_path)
    model = build_meta_model(reference.config, "auto")
    reader = CheckpointReader(tmp_path)
    try:
        plan = plan_checkpoint_load(model, reader)
        materialize(model, torch.device("cpu"))
        load_checkpoint_into(model, reader, plan)
    finally:
        reader.close()
    return reference, model


@pytest.mark.parametrize("builder", [tm.tiny_llama, tm.tiny_gemma3, tm.tiny_gemma3n, tm.tiny_deepseek_v4, tm.tiny_llava],
                         ids=lambda b: b.__name__)
def test_buffers_after_materialize_and_load_equal_a_plain_build(builder, tmp_path, monkeypatch):
    # NaN in every freshly materialized tensor: a buffer nobody computes cannot pass as zeros.
    monkeypatch.setenv("LIGHTNING_AUTOMODEL_FILL_UNINITIALIZED", "nan")
    reference, model = _reference_and_loaded(builder, tmp_path)
    expected = dict(reference.named_buffers())
    got = dict(model.named_buffers())
    assert expected and got.keys() == expected.keys()
    for name, buffer in expected.items():
        assert got[name].dtype == buffer.dtype, name
        torch.testing.assert_close(got[name], buffer, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(model.state_dict(), reference.state_dict(), rtol=0, atol=0)


class _Plain(nn.Module):
    """A module whose buffer only its constructor computes: nothing can compute it after a meta build."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.arange(4.0), persistent=False)


def test_a_buffer_no_init_computes_is_an_error_naming_it():
    with torch.device("meta"):
        model = nn.Sequential(_Plain())
    with pytest.raises(ValueError, match=r"0\.table.*_init_weights"):
        materialize(model, torch.device("cpu"))


def test_a_buffer_shared_by_two_modules_is_computed_once():
    from transformers import AutoModelForCausalLM

    config = tm.tiny_config("llama")
    reference = AutoModelForCausalLM.from_config(config)
    model = build_meta_model(config, "causal_lm")
    # The rotary table registered a second time, in a module whose init does not compute it.
    model.model.layers[0].register_buffer("inv_freq", model.model.rotary_emb.inv_freq, persistent=False)
    materialize(model, torch.device("cpu"))
    assert model.model.layers[0].inv_freq is model.model.rotary_emb.inv_freq  # still one tensor
    torch.testing.assert_close(model.model.layers[0].inv_freq, reference.model.rotary_emb.inv_freq, rtol=0, atol=0)
