"""Per-rank training memory: hand-computed expectations for FSDP2 padding, dtypes, frozen parameters."""

import dataclasses
import math

import pytest
import torch
from torch import nn

import tiny_models as tm
from lightning_automodel.core.memory import estimate_training_memory


def by_hand(model, world, *, param_size=None, state_size=4, states=2):
    """Independent computation: each unique parameter, dim 0 padded to a multiple of the world size."""
    params = grads = optim = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        rows = math.ceil(p.shape[0] / world) if p.dim() else 1
        local = rows * (p.numel() // p.shape[0] if p.dim() else 1)
        size = param_size or p.element_size()
        params += local * size
        if p.requires_grad:
            grads += local * size
            optim += local * state_size * states
    return params, grads, optim


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_tiny_llama_with_frozen_embedding_matches_hand_count(world):
    model = tm.tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    est = estimate_training_memory(model, world_size=world)
    assert (est.param_bytes, est.grad_bytes, est.optimizer_bytes) == by_hand(model, world)
    assert est.world_size == world
    assert est.total_bytes == est.param_bytes + est.grad_bytes + est.optimizer_bytes
    assert dataclasses.asdict(est)["total_bytes"] == est.total_bytes


def test_meta_model_estimates_like_the_real_one():
    with torch.device("meta"):
        meta = tm.build(tm.tiny_config("llama"))
    real = tm.tiny_llama()
    assert estimate_training_memory(meta, world_size=4) == estimate_training_memory(real, world_size=4)


def test_tied_weights_stored_once():
    model = tm.tiny_gemma3()
    est = estimate_training_memory(model, world_size=2)
    assert (est.param_bytes, est.grad_bytes, est.optimizer_bytes) == by_hand(model, 2)


def test_freezing_removes_grads_and_optimizer_state_only():
    model = tm.tiny_qwen3()
    before = estimate_training_memory(model, world_size=2)
    for p in model.model.layers.parameters():
        p.requires_grad_(False)
    after = estimate_training_memory(model, world_size=2)
    assert after.param_bytes == before.param_bytes
    assert after.grad_bytes < before.grad_bytes and after.optimizer_bytes < before.optimizer_bytes
    assert (after.param_bytes, after.grad_bytes, after.optimizer_bytes) == by_hand(model, 2)


def test_dtype_overrides_and_ddp():
    model = nn.Sequential(nn.Linear(10, 7, bias=False), nn.Linear(7, 3, bias=False))
    model[1].weight.requires_grad_(False)
    est = estimate_training_memory(
        model, world_size=4, param_dtype=torch.bfloat16, optimizer_state_dtype=torch.bfloat16, optimizer_states_per_param=1
    )
    assert (est.param_bytes, est.grad_bytes, est.optimizer_bytes) == by_hand(model, 4, param_size=2, state_size=2, states=1)
    ddp = estimate_training_memory(model, world_size=4, sharded=False, grad_dtype=torch.float16)
    assert ddp.param_bytes == (70 + 21) * 4 and ddp.grad_bytes == 70 * 2 and ddp.optimizer_bytes == 70 * 8


def test_params4bit_counts_packed_bytes():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4").to("cpu")
    layer.weight.requires_grad_(False)
    est = estimate_training_memory(nn.Sequential(layer), world_size=2)
    assert est.param_bytes == 64 * 32 // 2 // 2  # nf4: half a byte per logical element, split over 2 ranks
    assert est.grad_bytes == est.optimizer_bytes == 0


@pytest.mark.parametrize(("kwargs", "word"), [({"world_size": 0}, "world_size"), ({"optimizer_states_per_param": -1}, "optimizer_states_per_param")])
def test_bad_arguments_name_the_problem(kwargs, word):
    with pytest.raises(ValueError, match=word):
        estimate_training_memory(nn.Linear(2, 2), **kwargs)


def test_sharded_dtensor_model_estimates_like_the_unsharded_one():
    from torch.distributed.fsdp import fully_shard

    from core.pg import single_rank_group

    model = tm.tiny_llama()
    expected = estimate_training_memory(model, world_size=2)
    with single_rank_group():
        fully_shard(model)
        assert estimate_training_memory(model, world_size=2) == expected
