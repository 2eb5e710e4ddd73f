import pytest
import torch
from torch import nn

import tiny_models as tm
from lightning_automodel.core.dtypes import cast_floating_point, dtype_from_name
from core.pg import single_rank_group


def test_cast_keeps_parameter_identity_and_leaves_buffers():
    model = tm.tiny_llama()
    params = {n: p for n, p in model.named_parameters()}
    cast = cast_floating_point(model)
    assert set(cast) == set(params)
    for n, p in model.named_parameters():
        assert p is params[n] and p.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_cast_buffers_and_only_source_dtypes():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).half())
    model.register_buffer("scale", torch.ones(3))
    model.register_buffer("steps", torch.zeros(3, dtype=torch.long))
    cast = cast_floating_point(model, cast_buffers=True)
    assert set(cast) == {"0.weight", "0.bias", "scale"}
    assert model[1].weight.dtype == torch.float16 and model.steps.dtype == torch.long
    assert model.scale.dtype == torch.bfloat16


def test_values_and_grads_follow():
    model = nn.Linear(4, 4)
    expected = model.weight.detach().to(torch.bfloat16)
    model(torch.randn(2, 4)).sum().backward()
    cast_floating_point(model)
    assert torch.equal(model.weight.detach(), expected)
    assert model.weight.grad.dtype == torch.bfloat16


def test_tied_weights_stay_tied():
    model = tm.tiny_gemma3()
    cast_floating_point(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_matches_reference_with_buffers():
    ref = pytest.importorskip("nemo_automodel.components.utils.model_utils")
    from lightning_automodel.model_utils import cast_mixed_dtype_params_to_bf16

    ours, theirs = tm.tiny_llama(), tm.tiny_llama()
    cast_mixed_dtype_params_to_bf16(ours)
    ref.cast_mixed_dtype_params_to_bf16(theirs)
    for (n, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), n
    assert ours.model.rotary_emb.inv_freq.dtype == theirs.model.rotary_emb.inv_freq.dtype == torch.bfloat16


def test_cast_after_fully_shard_runs_forward_and_backward():
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    with single_rank_group():
        model = tm.tiny_llama()
        # A model with mixed trainable dtypes: FSDP2 would reject it at the first forward.
        model.model.layers[0].mlp.to(torch.bfloat16)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        before = {n: p for n, p in model.named_parameters()}
        cast_floating_point(model)
        for n, p in model.named_parameters():
            assert isinstance(p, DTensor) and p.dtype == torch.bfloat16, n
            assert p is before[n]
        ids = torch.randint(0, tm.VOCAB, (2, 8))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_mixed_dtype_without_cast_fails_in_fsdp2():
    from torch.distributed.fsdp import fully_shard

    with single_rank_group():
        model = tm.tiny_llama()
        model.model.layers[0].mlp.to(torch.bfloat16)
        fully_shard(model)
        ids = torch.randint(0, tm.VOCAB, (2, 8))
        with pytest.raises(AssertionError, match="uniform original parameter dtype"):
            model(input_ids=ids)


def test_dtype_names():
    assert dtype_from_name("bf16") is torch.bfloat16
    assert dtype_from_name("torch.float32") is torch.float32
    with pytest.raises(ValueError, match="Unknown dtype"):
        dtype_from_name("float8")
