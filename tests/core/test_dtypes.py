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


# ---- validation, names, memory ------------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def test_bad_target_dtype_is_rejected_before_anything_changes():
    model = tm.tiny_llama()
    before = {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="floating-point"):
        cast_floating_point(model, torch.int8)
    assert {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()} == before


def test_source_dtypes_select_what_is_cast_and_names_are_canonical():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = tm.tiny_llama()
    model.model.layers[0] = checkpoint_wrapper(model.model.layers[0])
    model.model.layers[0].mlp.half()
    model.model.norm.weight.requires_grad_(False)
    cast = cast_floating_point(model, torch.bfloat16, source_dtypes=(torch.float16,))
    assert set(cast) == {f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.float32
    assert cast_floating_point(model, torch.bfloat16, source_dtypes=(torch.float16,)) == []  # idempotent
    cast_floating_point(model)
    assert not model.model.norm.weight.requires_grad  # trainability is kept


def test_optimizer_keeps_working_on_the_same_parameters():
    model = tm.tiny_llama()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cast_floating_point(model)
    ids = torch.randint(0, tm.VOCAB, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    before = model.lm_head.weight.detach().clone()
    opt.step()
    assert opt.param_groups[0]["params"][0] is next(model.parameters())
    assert not torch.equal(model.lm_head.weight.detach(), before)


def test_cast_buffers_after_fully_shard():
    from torch.distributed.fsdp import fully_shard

    with single_rank_group():
        model = tm.tiny_llama()
        fully_shard(model)
        cast = cast_floating_point(model, cast_buffers=True)
        assert "model.rotary_emb.inv_freq" in cast and model.model.rotary_emb.inv_freq.dtype == torch.bfloat16
        ids = torch.randint(0, tm.VOCAB, (1, 4))
        model(input_ids=ids, labels=ids).loss.backward()


def _peak(impl: str) -> dict:
    script = Path(__file__).resolve().parent.parent / "scripts" / "core_cast_peak.py"
    root = script.parent.parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, str(script), impl, "16", "1024"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs /proc/self/clear_refs to reset the RSS peak")
def test_peak_extra_memory_is_about_one_tensor():
    ours, full_copy = _peak("ours"), _peak("copy")
    # The probe sees a full bf16 copy (half the fp32 model) when one is made...
    assert full_copy["extra_bytes"] >= 0.8 * full_copy["total_fp32"] / 2
    # ...and the cast stays near one tensor (16 tensors here, a full copy would be 8x this bound).
    assert ours["extra_bytes"] <= 1.1 * ours["largest_fp32"]


def test_export_dtype_names_come_from_the_one_table():
    from lightning_automodel.core.dtypes import dtype_from_name, export_dtype

    assert export_dtype("auto") is None
    for name in ("bf16", "bfloat16", "fp32", "float32"):
        assert export_dtype(name) is dtype_from_name(name)
    with pytest.raises(ValueError, match="auto, bf16, fp32; got 'fp16'"):
        export_dtype("fp16")  # a real dtype, but not one export writes
