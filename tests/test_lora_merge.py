"""LoRA written as a Hugging Face model: merged with peft's own per-layer merge, under the hub's names.

Every check randomizes the adapters (non-zero ``lora_B``, DoRA magnitudes off the weight norm) before
writing, so a merge that drops or mis-scales an adapter changes the logits.
"""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import tiny_models as tm
from callbacks.lit_models import loader
from lightning_automodel import HFCausalLM
from lightning_automodel.callbacks import LoRA
from lightning_automodel.callbacks.hugging_face_checkpoint import HuggingFaceCheckpoint
from lightning_automodel.core.lora import base_checkpoint_name, is_adapter_name

pytest.importorskip("peft")

OLMOE = dict(model_type="olmoe", vocab_size=256, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, num_experts=4, num_experts_per_tok=2, eos_token_id=1,
             pad_token_id=0, bos_token_id=2)
LLAMA = dict(model_type="llama", vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def fit_lora(config: dict, callbacks=(), **lora) -> tuple[pl.Trainer, HFCausalLM]:
    torch.manual_seed(0)
    module = HFCausalLM(config=config, learning_rate=1e-2)
    t = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0, callbacks=[LoRA(**lora), *callbacks])
    t.fit(module, loader(n=4, batch_size=2))
    return t, module


@torch.no_grad()
def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if is_adapter_name(name):
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + 0.3 * noise if "magnitude" in name else 0.2 * noise)


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    return model(input_ids=ids).logits


def peft_merged_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft's merge of every adapted layer (what ``merge_and_unload`` does), under the plain names."""
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(model)
    head = merged.get_output_embeddings()
    if head is not None and head.weight is merged.get_input_embeddings().weight:
        # peft merges into the shared tensor, which would move the head too; the trained model's head is the base
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    for layer in merged.modules():
        if isinstance(layer, LoraLayer):
            layer.merge()
    return {base_checkpoint_name(n): t for n, t in merged.state_dict().items() if not is_adapter_name(n)}


def assert_reload_matches(out, module: HFCausalLM) -> None:
    from transformers import AutoModelForCausalLM

    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    want = peft_merged_state(module.model)
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(logits(reloaded), logits(module.model), rtol=1e-5, atol=1e-5)


VARIANTS = {
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    "rank_alpha_pattern_rslora": dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                                      rank_pattern={"v_proj": 2, "up_proj": 6}, alpha_pattern={"o_proj": 3, "gate_proj": 20}),
    "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_merges_lora_variants_like_peft(variant, tmp_path):
    from lightning_automodel.export import export_checkpoint

    t, module = fit_lora(LLAMA, **VARIANTS[variant])
    randomize_adapters(module.model)
    t.save_checkpoint(tmp_path / "lora.ckpt")
    assert_reload_matches(export_checkpoint(tmp_path / "lora.ckpt", tmp_path / "merged"), module)


def test_export_merges_moe_expert_adapters(tmp_path):
    """OLMoE, all-linear (attention and router) plus the fused experts through target_parameters."""
    from lightning_automodel.export import export_checkpoint

    t, module = fit_lora(OLMOE, r=4, lora_alpha=8, target_modules="all-linear", target_parameters=EXPERTS)
    assert any("experts" in n and is_adapter_name(n) for n, _ in module.model.named_parameters())
    randomize_adapters(module.model)
    t.save_checkpoint(tmp_path / "lora.ckpt")
    out = export_checkpoint(tmp_path / "lora.ckpt", tmp_path / "merged")
    assert_reload_matches(out, module)


TIED = {**LLAMA, "tie_word_embeddings": True}


@pytest.mark.parametrize(("config", "lora"), [(LLAMA, {}), (TIED, {}), (TIED, dict(target_modules=["embed_tokens", "q_proj"])),
                                              (OLMOE, dict(target_parameters=EXPERTS))], ids=["llama", "tied", "tied-embedding", "olmoe"])
def test_hugging_face_checkpoint_of_lora_is_the_merged_model(config, lora, tmp_path):
    callback = HuggingFaceCheckpoint(dirpath=str(tmp_path / "hf"))
    t, module = fit_lora(config, callbacks=[callback], r=4, lora_alpha=8, **lora)
    if "embed_tokens" not in lora.get("target_modules", ()):  # embedding adapters start uninitialized (issue 17 item 3)
        assert_reload_matches(tmp_path / "hf" / "final", module)  # the trained model as fit left it
    randomize_adapters(module.model)
    out = callback.save(t, module, tmp_path / "hf" / "random")
    assert_reload_matches(out, module)


@pytest.mark.parametrize("variant", ["plain", *sorted(VARIANTS)])
def test_hugging_face_checkpoint_adapter_only_loads_with_peft(variant, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tm.build(tm.tiny_config("llama", **{k: v for k, v in LLAMA.items() if k != "model_type"})).save_pretrained(tmp_path / "base")
    module = HFCausalLM(pretrained_path=str(tmp_path / "base"), learning_rate=1e-2)
    callback = HuggingFaceCheckpoint(dirpath=str(tmp_path / "hf"), adapter_only=True, save_on_train_end=False)
    t = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0, callbacks=[LoRA(**VARIANTS.get(variant, dict(r=4, lora_alpha=8))), callback])
    t.fit(module, loader(n=4, batch_size=2))
    randomize_adapters(module.model)
    out = callback.save(t, module, tmp_path / "hf" / "adapter")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), out)
    torch.testing.assert_close(logits(peft_model), logits(module.model), rtol=1e-5, atol=1e-5)


def test_a_name_the_model_does_not_have_is_refused_before_writing(tmp_path):
    from lightning_automodel.core.hub_layout import plan_hub_layout
    from lightning_automodel.core.model_build import build_meta_model

    model = build_meta_model(tm.tiny_config("llama"), "causal_lm")
    specs = {n: (tuple(t.shape), t.dtype) for n, t in model.state_dict().items()}
    plan_hub_layout(model, specs)  # the model's own names plan
    specs["model.layers.0.self_attn.q_proj.base_layer.weight"] = specs.pop("model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(ValueError, match=r"q_proj\.base_layer\.weight is not a tensor of LlamaForCausalLM.*nothing was written"):
        plan_hub_layout(model, specs)


def test_hugging_face_checkpoint_refuses_a_name_the_model_class_lacks_before_writing(tmp_path):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    callback = HuggingFaceCheckpoint(dirpath=str(tmp_path / "hf"), save_on_train_end=False)
    t, module = fit_lora(LLAMA, callbacks=[callback], r=4, lora_alpha=8)
    module.model.model.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))  # e.g. a user's addition
    with pytest.raises(MisconfigurationException, match=r"model\.extra is not a tensor of LlamaForCausalLM"):
        callback.save(t, module, tmp_path / "hf" / "out")
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


def test_a_quantized_base_is_refused_in_one_line():
    from lightning_automodel.core.lora_merge import LoraMergeError, refuse_quantized_base

    class Params4bit(torch.nn.Parameter):  # stands for bitsandbytes' class, matched by name
        pass

    model = torch.nn.Linear(2, 2)
    refuse_quantized_base(model)
    model.weight = Params4bit(torch.zeros(2, 2))
    with pytest.raises(LoraMergeError, match="QLoRA.*adapter_only"):
        refuse_quantized_base(model)


@pytest.mark.multiprocess
@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("lora-*.yaml")))
def test_shipped_lora_configs_write_a_loadable_trained_model(config, tmp_path):
    """Each configs/lora-*.yaml, 2 steps on its own devices (FSDP2 on 2 ranks for lora-fsdp2-cpu)."""
    import yaml
    from distributed import run_torchrun

    path = CONFIGS / config
    devices = yaml.safe_load(path.read_text())["trainer"]["devices"]
    proc = run_torchrun("job_lora_configs.py", str(tmp_path), str(path), nproc=devices, timeout=400)
    assert f"OK job_lora_configs {config}" in proc.stderr


@pytest.mark.multiprocess
def test_fsdp2_moe_lora_hugging_face_checkpoint_reloads_to_the_trained_logits(tmp_path):
    """lora-fsdp2-cpu.yaml on OLMoE with all-linear: router and fused experts adapted (ParamWrapper), sharded on 2 ranks."""
    import yaml
    from distributed import run_torchrun

    config = yaml.safe_load((CONFIGS / "lora-fsdp2-cpu.yaml").read_text())
    config["model"]["config"] = {**OLMOE, "vocab_size": 260, "hidden_size": 64, "max_position_embeddings": 512}
    config["trainer"]["callbacks"][0]["init_args"] = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    path = tmp_path / "lora-olmoe-fsdp2.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = run_torchrun("job_lora_configs.py", str(tmp_path), str(path), nproc=2, timeout=400)
    assert "OK job_lora_configs lora-olmoe-fsdp2.yaml" in proc.stderr


def test_hugging_face_checkpoint_of_qlora_refuses_the_merge_and_writes_the_adapter(tmp_path):
    pytest.importorskip("bitsandbytes")
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    qlora = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}
    tm.tiny_llama().save_pretrained(tmp_path / "base")
    module = HFCausalLM(pretrained_path=str(tmp_path / "base"), learning_rate=1e-2, quantization=qlora)
    merged = HuggingFaceCheckpoint(dirpath=str(tmp_path / "hf"), save_on_train_end=False)
    t = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0, callbacks=[LoRA(r=4), merged])
    t.fit(module, loader(n=4, batch_size=2))
    with pytest.raises(MisconfigurationException, match=r"quantized \(Params4bit\) base weight.*adapter_only=True"):
        merged.save(t, module, tmp_path / "hf" / "merged")
    assert not (tmp_path / "hf" / "merged").exists()
    out = HuggingFaceCheckpoint(adapter_only=True).save(t, module, tmp_path / "hf" / "adapter")
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
