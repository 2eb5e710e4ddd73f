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


def test_dtypes_and_ddp():
    model = nn.Sequential(nn.Linear(10, 7, bias=False), nn.Linear(7, 3, bias=False)).to(torch.bfloat16)
    model[1].weight.requires_grad_(False)
    est = estimate_training_memory(model, world_size=4, optimizer_state_dtype=torch.bfloat16)
    assert (est.param_bytes, est.grad_bytes, est.optimizer_bytes) == by_hand(model, 4, param_size=2, state_size=2)
    ddp = estimate_training_memory(model, world_size=4, sharded=False, optimizer_state_dtype=None)
    assert ddp.param_bytes == (70 + 21) * 2 and ddp.grad_bytes == 70 * 2 and ddp.optimizer_bytes == 70 * 2 * 2


def test_params4bit_counts_packed_bytes():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 32, bias=False, quant_type="nf4").to("cpu")
    layer.weight.requires_grad_(False)
    est = estimate_training_memory(nn.Sequential(layer), world_size=2)
    assert est.param_bytes == 64 * 32 // 2 // 2  # nf4: half a byte per logical element, split over 2 ranks
    assert est.grad_bytes == est.optimizer_bytes == 0


@pytest.mark.parametrize(("kwargs", "word"), [({"world_size": 0}, "world_size")])
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


# ---- FSDP2 layout and peak -------------------------------------------------------------------

from lightning_automodel.core.fsdp_layout import fsdp2_groups  # noqa: E402
from lightning_automodel.core.memory import estimate_fsdp2_peak  # noqa: E402

# tm.tiny_llama() written out by hand: hidden 64, intermediate 128, 4 heads / 2 KV heads of 16, vocab 256.
LAYER_SHAPES = {
    "self_attn.q_proj.weight": (64, 64), "self_attn.k_proj.weight": (32, 64), "self_attn.v_proj.weight": (32, 64),
    "self_attn.o_proj.weight": (64, 64), "mlp.gate_proj.weight": (128, 64), "mlp.up_proj.weight": (128, 64),
    "mlp.down_proj.weight": (64, 128), "input_layernorm.weight": (64,), "post_attention_layernorm.weight": (64,),
}
HAND_GROUPS = {
    "model.layers.0": {f"model.layers.0.{k}": v for k, v in LAYER_SHAPES.items()},
    "model.layers.1": {f"model.layers.1.{k}": v for k, v in LAYER_SHAPES.items()},
    "embedding": {"model.embed_tokens.weight": (256, 64)},
    "norm+head": {"model.norm.weight": (64,), "lm_head.weight": (256, 64)},
}


def _rows(shape, world):
    """(local elements, padded unsharded elements) of one tensor sharded on dim 0 over ``world`` ranks."""
    rest = math.prod(shape[1:])
    local_rows = math.ceil(shape[0] / world)
    return local_rows * rest, local_rows * world * rest


def test_fsdp2_groups_of_an_untied_llama():
    groups = fsdp2_groups(tm.tiny_llama())
    assert [g for g, _ in groups] == ["model.layers.0", "model.layers.1", "embedding", "norm+head", "root"]
    assert {g: set(names) for g, names in groups if g != "root"} == {g: set(v) for g, v in HAND_GROUPS.items()}
    assert dict(groups)["root"] == []


def _groups_by_full_traversal(model):
    """The layout's groups resolved the slow, obvious way: every module by canonical name, then its parameters."""
    from lightning_automodel.core.fsdp_layout import fsdp2_group_modules
    from lightning_automodel.core.naming import canonical_named_modules, unique_named_parameters

    by_name = dict(canonical_named_modules(model))
    first = {id(p): n for n, p in unique_named_parameters(model)}
    claimed, out = set(), []
    for group, paths in fsdp2_group_modules(model):
        params = [p for _, p in unique_named_parameters(model)] if group == "root" else [
            p for path in paths for p in by_name[path].parameters()]
        names = []
        for p in params:
            if id(p) not in claimed:
                claimed.add(id(p))
                names.append(first[id(p)])
        out.append((group, names))
    return out


@pytest.mark.parametrize("make", ["llama", "gemma3", "llava", "llama-checkpointed", "llava-compiled-tower"])
def test_fsdp2_groups_equal_a_full_traversal(make):
    """The layout's index skips the insides of layer lists; wrappers and towers must resolve as a full walk does."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model = {"llama": tm.tiny_llama, "gemma3": tm.tiny_gemma3, "llava": tm.tiny_llava,
             "llama-checkpointed": tm.tiny_llama, "llava-compiled-tower": tm.tiny_llava}[make]()
    if make == "llama-checkpointed":
        layer_type = type(model.model.layers[0])
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, layer_type))
        assert "_checkpoint_wrapped_module" in dict(model.named_modules())["model.layers.0"]._modules
    if make == "llava-compiled-tower":
        model.model.vision_tower = torch.compile(model.model.vision_tower)  # an OptimizedModule: `_orig_mod` inside
    expected = _groups_by_full_traversal(model)
    assert fsdp2_groups(model) == expected
    assert sum(len(names) for _, names in expected) == len({id(p) for p in model.parameters()})


def test_fsdp2_groups_tied_and_vlm():
    tied = dict(fsdp2_groups(tm.tiny_gemma3()))
    assert list(tied) == ["model.layers.0", "model.layers.1", "embedding+norm+head", "root"]
    assert tied["embedding+norm+head"] == ["model.embed_tokens.weight", "model.norm.weight"]  # the head is the embedding
    vlm = dict(fsdp2_groups(tm.tiny_llava()))
    assert list(vlm) == [
        "model.language_model.layers.0", "model.language_model.layers.1", "model.vision_tower", "embedding", "norm+head", "root",
    ]
    assert vlm["norm+head"] == ["model.language_model.norm.weight", "lm_head.weight"]  # not the vision tower's norms
    assert vlm["root"] and all(n.startswith("model.multi_modal_projector.") for n in vlm["root"])
    model = tm.tiny_llava()
    every = [n for names in vlm.values() for n in names]
    assert sorted(every) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once


@pytest.mark.parametrize("world", [1, 3, 8])
@pytest.mark.parametrize("offload", [False, True])
def test_fsdp2_peak_matches_hand_computation(world, offload):
    model = tm.tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    est = estimate_fsdp2_peak(
        model, world_size=world, groups=fsdp2_groups(model), compute_dtype=torch.bfloat16, reduce_dtype=torch.float32,
        cpu_offload=offload,
    )
    params = grads = optim = 0
    gathered, reduced = {}, {}
    for group, shapes in HAND_GROUPS.items():
        gathered[group] = reduced[group] = 0
        for name, shape in shapes.items():
            local, padded = _rows(shape, world)
            params += local * 4  # fp32 weights
            gathered[group] += padded * 2  # all-gathered in bf16
            if name != "model.embed_tokens.weight":
                grads += local * 4
                optim += local * 4 * 2  # AdamW: exp_avg and exp_avg_sq in the parameter dtype
                reduced[group] += padded * (2 + 4)  # bf16 unsharded grads + fp32 reduce-scatter buffer
    resharded = sorted((gathered[g] for g in ("model.layers.0", "model.layers.1", "embedding")), reverse=True)
    gather = resharded[0] + resharded[1] + gathered["norm+head"]
    reduce = max(reduced.values())
    assert (est.param_bytes, est.grad_bytes, est.optimizer_bytes) == (params, grads, optim)
    assert (est.gather_bytes, est.reduce_bytes) == (gather, reduce)
    assert est.kept_groups == ("norm+head",) and len(est.prefetched_groups) == 2
    assert est.total_bytes == params + grads + optim + gather + reduce
    if offload:
        assert (est.device_bytes, est.host_bytes) == (gather + reduce, params + grads + optim)
    else:
        assert (est.device_bytes, est.host_bytes) == (params + grads + optim + gather + reduce, 0)
    # The sharded state is what estimate_training_memory reports.
    plain = estimate_training_memory(model, world_size=world, optimizer_state_dtype=None)
    assert (plain.param_bytes, plain.grad_bytes, plain.optimizer_bytes) == (params, grads, optim)


def test_fsdp2_peak_bf16_weights_and_no_mixed_precision():
    model = tm.tiny_llama()
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    est = estimate_fsdp2_peak(model, world_size=2)  # groups from the model, compute and reduce in the stored dtype
    n_layer = sum(math.prod(s) for s in LAYER_SHAPES.values())  # every dim 0 here divides by 2
    n_total = 2 * n_layer + 256 * 64 + 64 + 256 * 64
    assert est.param_bytes == est.grad_bytes == n_total * 2 // 2
    assert est.optimizer_bytes == n_total * 2 * 2 // 2  # AdamW state follows the bf16 weights
    assert est.gather_bytes == 2 * n_layer * 2 + (64 + 256 * 64) * 2
    assert est.reduce_bytes == n_layer * (2 + 2)


def test_fsdp2_peak_tied_group_is_resharded_and_meta_safe():
    with torch.device("meta"):
        meta = tm.build(tm.tiny_config("gemma3_text"))
    real = tm.tiny_gemma3()
    assert estimate_fsdp2_peak(meta, world_size=4) == estimate_fsdp2_peak(real, world_size=4)
    est = estimate_fsdp2_peak(real, world_size=4)
    assert est.kept_groups == ()  # the tied embedding+norm+head group reshards; the root is empty


def test_fsdp2_peak_bad_input():
    model = tm.tiny_llama()
    with pytest.raises(ValueError, match="world_size"):
        estimate_fsdp2_peak(model, world_size=0)
    with pytest.raises(ValueError, match="model.nope.weight"):
        estimate_fsdp2_peak(model, world_size=2, groups=[("x", ["model.nope.weight"])])
    # Parameters no group names land in the root group, as fully_shard(model) takes them.
    est = estimate_fsdp2_peak(model, world_size=1, groups=[])
    assert est.kept_groups == ("root",) and est.prefetched_groups == ()
