import math

import pytest
import torch
from torch import nn

import tiny_models as tm
from core.pg import single_rank_group
from lightning_automodel.core.memory import estimate_training_memory
from lightning_automodel.core.parameters import (
    count_parameters,
    logical_numel,
    module_breakdown,
    parameter_stats,
)


def manual_counts(model):
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def test_counts_and_order():
    model = tm.tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    counts = count_parameters(model)
    assert counts == manual_counts(model)
    assert counts.trainable == counts.total - tm.VOCAB * 64


def test_tied_counted_once():
    model = tm.tiny_gemma3()
    assert count_parameters(model).total == sum(p.numel() for p in model.parameters())
    assert count_parameters(model).total < sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))


def test_meta_model_counts():
    with torch.device("meta"):
        model = tm.build(tm.tiny_config("llama"))
    assert count_parameters(model) == manual_counts(tm.tiny_llama())
    assert math.isnan(parameter_stats(model).l2_norm)


def test_params4bit_logical_numel():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4").to("cpu")
    w = layer.weight
    assert w.quant_state is not None
    assert w.numel() == 64 * 32 // 2  # two 4-bit values per byte
    assert logical_numel(w) == 64 * 32
    model = nn.Sequential(layer)
    assert count_parameters(model).total == 64 * 32


def test_params4bit_reference_agrees_on_numel():
    pytest.importorskip("bitsandbytes")
    ref = pytest.importorskip("nemo_automodel.components.utils.model_utils")
    import bitsandbytes as bnb

    w = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4").to("cpu").weight
    assert ref._get_logical_numel(w) == logical_numel(w)


def test_norm_matches_manual():
    model = tm.tiny_llama()
    expected = math.sqrt(sum(p.detach().double().pow(2).sum().item() for p in model.parameters()))
    assert parameter_stats(model).l2_norm == pytest.approx(expected, rel=1e-6)


def test_dtensor_counts_and_norm_on_one_rank():
    from torch.distributed.fsdp import fully_shard

    model = tm.tiny_llama()
    expected_counts = count_parameters(model)
    expected_norm = parameter_stats(model).l2_norm
    with single_rank_group():
        fully_shard(model)
        stats = parameter_stats(model)
    assert (stats.trainable, stats.total) == tuple(expected_counts)
    assert stats.l2_norm == pytest.approx(expected_norm, rel=1e-6)


def test_breakdown_attributes_rules():
    model = tm.tiny_llama()
    model.lm_head.weight.requires_grad_(False)
    model.model.norm.weight.requires_grad_(False)
    rows = {r.name: r for r in module_breakdown(model, frozen_by={"lm_head.weight": "freeze_modules[path: lm_head]"})}
    assert set(rows) == {"model.embed_tokens", "model.layers", "model.norm", "lm_head"}
    assert rows["lm_head"].frozen_by == {"freeze_modules[path: lm_head]": tm.VOCAB * 64}
    assert rows["model.norm"].frozen_by == {"already frozen": 64}
    assert sum(r.total for r in rows.values()) == count_parameters(model).total


def test_memory_estimate_by_hand():
    model = nn.Sequential(nn.Linear(10, 7, bias=False), nn.Linear(7, 3, bias=False))
    model[1].weight.requires_grad_(False)
    est = estimate_training_memory(model, world_size=4)
    # dim 0 sharded with padding: ceil(7/4)*10 = 20 and ceil(3/4)*7 = 7 elements per rank.
    assert est.param_bytes == (20 + 7) * 4
    assert est.grad_bytes == 20 * 4
    assert est.optimizer_bytes == 20 * 4 * 2
    assert est.total_bytes == est.param_bytes + est.grad_bytes + est.optimizer_bytes
    bf16 = estimate_training_memory(model.to(torch.bfloat16), world_size=1, sharded=False)
    assert bf16.param_bytes == (70 + 21) * 2 and bf16.grad_bytes == 70 * 2 and bf16.optimizer_bytes == 70 * 8
    with pytest.raises(ValueError):
        estimate_training_memory(model, world_size=0)


@pytest.mark.parametrize("builder", [tm.tiny_llama, tm.tiny_qwen3, tm.tiny_gemma3, tm.tiny_gemma4, tm.tiny_deepseek_v4, tm.tiny_minimax_m3, tm.tiny_llava])
def test_counts_match_reference_across_architectures(builder):
    ref = pytest.importorskip("nemo_automodel.components.utils.model_utils")
    model = builder()
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 != 0)
    assert tuple(count_parameters(model)) == tuple(ref.count_model_parameters(model)) == manual_counts(model)


# ---- quantized, integer and complex parameters -------------------------------------------------------


def test_quantized_params4bit_counts_and_norm_skip_packed_bytes():
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    packed = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")._quantize("cpu")
    assert packed.quant_state.shape == (32, 64) and packed.numel() == 32 * 64 // 2
    holder = nn.Module()
    holder.packed = packed
    holder.head = nn.Linear(64, 3)
    counts = count_parameters(holder)
    assert counts == (64 * 3 + 3, 32 * 64 + 64 * 3 + 3)
    expected = math.sqrt(sum(p.detach().double().pow(2).sum().item() for p in holder.head.parameters()))
    assert parameter_stats(holder).l2_norm == pytest.approx(expected, rel=1e-9)  # packed uint8 bytes are not a norm


def test_params4bit_without_quant_state_uses_plain_numel():
    bnb = pytest.importorskip("bitsandbytes")
    p = bnb.nn.Params4bit(torch.randn(4, 8), requires_grad=False, quant_type="nf4")
    assert p.quant_state is None and logical_numel(p) == 32


def test_complex_parameters_count_their_magnitude():
    holder = nn.Module()
    holder.z = nn.Parameter(torch.tensor([3 + 4j, 0 + 1j]))
    assert parameter_stats(holder).l2_norm == pytest.approx(math.sqrt(25 + 1))


def test_breakdown_depth_and_tied_weights():
    model = tm.tiny_gemma3()
    rows = module_breakdown(model, depth=1)
    assert [r.name for r in rows] == ["model"]  # the tied lm_head is listed under its first name
    assert rows[0].total == count_parameters(model).total
    deep = {r.name: r for r in module_breakdown(model, depth=3)}
    assert deep["model.layers.0"].total == sum(p.numel() for p in model.model.layers[0].parameters())
