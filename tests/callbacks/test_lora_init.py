"""Every LoRA tensor the job materializes is written by peft's own init, on top of the loaded base.

The suite fills materialized memory with NaN (tests/conftest.py), so a tensor nobody writes shows.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

import tiny_models as tm
from callbacks.lit_models import loader
from lightning_automodel import HFCausalLM
from lightning_automodel.callbacks import LoRA
from lightning_automodel.core.lora import LoraConfigError, initialize_adapters
from lightning_automodel.core.model_build import FILL_UNINITIALIZED_ENV

pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _nan_fill(monkeypatch):
    monkeypatch.setenv(FILL_UNINITIALIZED_ENV, "nan")  # on for the suite already; explicit here


def fitted(tmp_path, **lora):
    base = tm.tiny_llama()
    base.save_pretrained(tmp_path / "base")
    module = HFCausalLM(pretrained_path=str(tmp_path / "base"), learning_rate=1e-2, seed=3)
    trainer = pl.Trainer(max_steps=0, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[LoRA(r=4, lora_alpha=8, **lora)])
    trainer.fit(module, loader(n=8))
    return base.eval(), module.model.eval()


def logits(model):
    ids = next(iter(loader(n=4, batch_size=4)))["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapters(model):
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("lora", [
    dict(use_dora=True),
    dict(target_modules=["embed_tokens", "q_proj"]),
    dict(init_lora_weights="gaussian"),
    dict(use_dora=True, target_modules=["embed_tokens", "v_proj"], init_lora_weights="gaussian"),
], ids=["dora", "embedding", "gaussian", "dora-embedding-gaussian"])
def test_step_zero_logits_equal_the_base(tmp_path, lora):
    base, model = fitted(tmp_path, **lora)
    values = adapters(model)
    assert values and all(torch.isfinite(t).all() for t in values.values()), [n for n, t in values.items() if not torch.isfinite(t).all()]
    torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=1e-6)
    if lora.get("use_dora"):
        # DoRA's magnitude is the row norm of the loaded base weight (B = 0)
        weight = dict(base.named_parameters())["model.layers.0.self_attn.v_proj.weight"]
        magnitude = values["model.layers.0.self_attn.v_proj.lora_magnitude_vector.default.weight"]
        torch.testing.assert_close(magnitude, weight.detach().norm(dim=1), rtol=0, atol=1e-6)
    if "embed_tokens" in lora.get("target_modules", []):
        assert torch.count_nonzero(values["model.embed_tokens.lora_embedding_A.default"]) == 0
        assert values["model.embed_tokens.lora_embedding_B.default"].std() > 0.5  # peft's N(0, 1)


def test_init_false_is_peft_random_b(tmp_path):
    base, model = fitted(tmp_path, init_lora_weights=False, target_modules=["q_proj", "embed_tokens"])
    values = adapters(model)
    assert all(torch.isfinite(t).all() for t in values.values())
    a = values["model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    b = values["model.layers.0.self_attn.q_proj.lora_B.default.weight"]
    # nn.Linear's own init, as peft leaves it: Kaiming-uniform within 1/sqrt(fan_in), B not zero
    assert 0 < a.abs().max() <= 1 / math.sqrt(a.shape[1]) and 0 < b.abs().max() <= 1 / math.sqrt(b.shape[1])
    assert torch.count_nonzero(values["model.embed_tokens.lora_embedding_A.default"]) > 0  # torch.randn
    out = logits(model)
    assert torch.isfinite(out).all() and not torch.allclose(out, logits(base))


def test_init_is_the_same_for_the_same_seed_and_names_its_limits():
    from lightning_automodel.core.lora import inject_lora, lora_config

    def adapted(seed):
        model = tm.tiny_llama()
        inject_lora(model, lora_config(r=4, use_dora=True))
        initialize_adapters(model, seed=seed)
        return adapters(model)

    first, again, other = adapted(1), adapted(1), adapted(2)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first if "lora_A" in n)
    with pytest.raises(LoraConfigError, match="pissa"):
        initialize_adapters(tm.tiny_llama(), init="pissa")


@pytest.mark.multiprocess
def test_two_rank_fsdp2_dora_and_embedding_adapters_equal_one_device(tmp_path):
    from distributed import run_torchrun

    run_torchrun("job_lora_init_fsdp2.py", str(tmp_path), timeout=600)


def test_fused_moe_expert_adapters_are_initialized_and_start_at_the_base():
    """peft adapts fused experts through ParamWrapper (the wrapped tensor is not named ``weight``)."""
    from lightning_automodel.core.lora import inject_lora, lora_config

    model = tm.build(tm.tiny_config("mixtral", num_local_experts=3, num_experts_per_tok=2)).eval()
    before = logits(model)
    inject_lora(model, lora_config(r=4, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.fill_(float("nan"))
    assert initialize_adapters(model, seed=1) > 0
    values = adapters(model)
    assert any("experts" in n for n in values) and all(torch.isfinite(t).all() for t in values.values())
    torch.testing.assert_close(logits(model), before, rtol=0, atol=1e-6)
