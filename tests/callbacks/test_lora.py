"""LoRA through peft: injected in place before sharding, base frozen, checkpoints of the base load, exact merge."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

import tiny_models as tm
from callbacks.lit_models import InitLM, loader
from lightning_automodel import HFCausalLM
from lightning_automodel.callbacks import LoRA, ParameterFreezing
from lightning_automodel.core.lora import LoraConfigError, is_adapter_name

pytest.importorskip("peft")


def trainer(steps=3, callbacks=()):
    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks))


def batch():
    return next(iter(loader(n=4, batch_size=4)))


def test_hf_causal_lm_with_lora_loads_the_base_and_starts_equal_to_it(tmp_path):
    base = tm.tiny_llama()
    base.save_pretrained(tmp_path / "base")
    module = HFCausalLM(pretrained_path=str(tmp_path / "base"), learning_rate=1e-2)
    t = trainer(steps=0, callbacks=[LoRA(r=4, lora_alpha=8)])
    t.fit(module, loader(n=8))
    model = module.model
    names = [n for n, _ in model.named_parameters()]
    assert any(".q_proj.base_layer.weight" in n for n in names) and any("lora_A.default" in n for n in names)
    assert not any("lm_head.lora" in n for n in names)  # all-linear leaves the output head alone
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_name(n) for n in trainable)
    # the base weights are the checkpoint's, bit for bit; B = 0 so the outputs are the base model's
    reference = base.state_dict()
    for name, tensor in model.state_dict().items():
        if not is_adapter_name(name):
            assert torch.equal(tensor, reference[name.replace(".base_layer", "")]), name
    b = batch()
    model.eval()
    base.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=b["input_ids"]).logits, base(input_ids=b["input_ids"]).logits)


def test_lora_trains_adapters_only_and_unfreeze_wins_for_the_head():
    module = HFCausalLM(config=dict(tm.tiny_config("llama").to_dict()), learning_rate=1e-2)
    t = trainer(steps=4, callbacks=[LoRA(r=4, target_modules=["q_proj", "v_proj"]),
                                    ParameterFreezing(unfreeze_modules=[{"path": "lm_head"}])])
    t.fit(module, loader(n=32))
    model = module.model
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert "lm_head.weight" in trainable
    assert all(is_adapter_name(n) or n == "lm_head.weight" for n in trainable)
    assert {n.split(".")[-4] for n in trainable if is_adapter_name(n)} == {"q_proj", "v_proj"}
    optimizer = t.optimizers[0]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert any(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)  # they trained


def test_lora_on_a_users_module_built_in_init():
    module = InitLM(tm.tiny_llama)
    t = trainer(steps=2, callbacks=[LoRA(r=2)])
    t.fit(module, loader(n=16))
    assert all(is_adapter_name(n) for n, p in module.model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("targets, match", [(["q_proj", "qq_proj"], "'qq_proj' matches no module.*q_proj"), (["lm_headx"], "lm_headx")])
def test_bad_targets_are_one_line_and_leave_the_model_untouched(targets, match):
    model = tm.tiny_llama()
    before = [n for n, _ in model.named_parameters()]
    callback = LoRA(target_modules=targets)
    with pytest.raises(LoraConfigError, match=match):
        callback.inject(model)
    assert [n for n, _ in model.named_parameters()] == before and all(p.requires_grad for p in model.parameters())


def test_bad_lora_settings():
    with pytest.raises(LoraConfigError, match="positive integer"):
        LoRA(r=0)
    with pytest.raises(LoraConfigError, match="pissa"):
        LoRA(init_lora_weights="pissa")


@pytest.fixture(scope="module")
def trained_lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = tm.tiny_llama(tie_word_embeddings=True)
    base.save_pretrained(root / "base")
    module = HFCausalLM(pretrained_path=str(root / "base"), learning_rate=2e-2)
    t = trainer(steps=4, callbacks=[LoRA(r=4, lora_alpha=8, use_rslora=True)])
    t.fit(module, loader(n=32))
    t.save_checkpoint(root / "lora.ckpt")
    return root, module


def test_export_merges_adapters_like_peft(trained_lora, tmp_path):
    import copy

    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    from lightning_automodel.export import export_checkpoint

    root, module = trained_lora
    out = export_checkpoint(root / "lora.ckpt", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n or "base_layer" in n for n in merged.state_dict())
    peft_merged = copy.deepcopy(module.model)
    for layer in peft_merged.modules():
        if isinstance(layer, LoraLayer):
            layer.merge()
    want = {n.replace(".base_layer", ""): t for n, t in peft_merged.state_dict().items() if not is_adapter_name(n)}
    for name, tensor in merged.state_dict().items():
        assert torch.allclose(tensor, want[name], rtol=0, atol=1e-6), name
    b = batch()
    module.model.eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=b["input_ids"]).logits, module.model(input_ids=b["input_ids"]).logits, atol=1e-5)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # the tie survives the merge


def test_export_adapter_only_loads_with_peft(trained_lora, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lightning_automodel.export import ExportError, export_checkpoint

    root, module = trained_lora
    out = export_checkpoint(root / "lora.ckpt", tmp_path / "adapter", adapter_only=True)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), out)
    model.eval()
    module.model.eval()
    b = batch()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=b["input_ids"]).logits, module.model(input_ids=b["input_ids"]).logits, atol=1e-5)
    plain = tmp_path / "plain.ckpt"
    trainer_plain = trainer(steps=1)
    trainer_plain.fit(HFCausalLM(pretrained_path=str(root / "base")), loader(n=8))
    trainer_plain.save_checkpoint(plain)
    with pytest.raises(ExportError, match="no LoRA adapters"):
        export_checkpoint(plain, tmp_path / "none", adapter_only=True)


@pytest.mark.multiprocess
def test_two_rank_fsdp2_lora_resumes_bit_exactly_and_exports(tmp_path):
    from distributed import run_torchrun
    from transformers import AutoModelForCausalLM

    from lightning_automodel.export import export_checkpoint

    proc = run_torchrun("job_lora.py", str(tmp_path), nproc=2, timeout=400)
    assert "OK job_lora" in proc.stderr
    out = export_checkpoint(tmp_path / "final.ckpt", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    state = torch.load(tmp_path / "final_state.pt")
    factor = 8 / 4  # lora_alpha / r: peft's Linear merge is base + (B @ A) * scaling
    for name, tensor in merged.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if f"{module}.lora_A.default.weight" in state:
            want = state[f"{module}.base_layer.weight"] + (state[f"{module}.lora_B.default.weight"] @ state[f"{module}.lora_A.default.weight"]) * factor
        else:
            want = state[name]
        assert torch.equal(tensor, want), name


QLORA = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}


def test_qlora_on_one_device_trains_adapters_on_a_4bit_base_and_resumes(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    tm.tiny_llama().save_pretrained(tmp_path / "base")
    module = HFCausalLM(pretrained_path=str(tmp_path / "base"), learning_rate=2e-2, quantization=QLORA)
    t = trainer(steps=3, callbacks=[LoRA(r=4)])
    t.fit(module, loader(n=24))
    model = module.model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter_name(n) for n in trainable)
    assert any(float(p.detach().abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)
    t.save_checkpoint(tmp_path / "qlora.ckpt")
    resumed = HFCausalLM(pretrained_path=str(tmp_path / "base"), learning_rate=2e-2, quantization=QLORA)
    t2 = trainer(steps=4, callbacks=[LoRA(r=4)])
    t2.fit(resumed, loader(n=24), ckpt_path=tmp_path / "qlora.ckpt")
    assert t2.global_step == 4
    from lightning_automodel.export import ExportError, export_checkpoint

    with pytest.raises(ExportError, match="--adapter_only"):
        export_checkpoint(tmp_path / "qlora.ckpt", tmp_path / "merged")
    out = export_checkpoint(tmp_path / "qlora.ckpt", tmp_path / "adapter", adapter_only=True)
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("settings, match", [({"load_in_4bit": True, "bnb_4bit_quant_typo": "nf4"}, "bnb_4bit_quant_typo"),
                                             ({"load_in_4bit": False}, "load_in_4bit: true")])
def test_bad_quantization_is_one_line(settings, match):
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match=match):
        HFCausalLM(pretrained_path="x", quantization=settings)
    with pytest.raises(ValueError, match="pretrained_path"):
        HFCausalLM(config={"model_type": "llama"}, quantization={"load_in_4bit": True})


def test_qlora_under_fsdp2_is_refused_at_setup(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_automodel.cli import main

    tm.build(tm.tiny_config("llama", vocab_size=260)).save_pretrained(tmp_path / "base")  # the byte tokenizer's 259 ids fit
    config = tmp_path / "qlora.yaml"
    config.write_text(
        f"model: {{pretrained_path: {tmp_path / 'base'}, quantization: {{load_in_4bit: true}}}}\n"
        "trainer: {accelerator: cpu, devices: 1, max_steps: 1, logger: false, enable_checkpointing: false,\n"
        "  strategy: {class_path: lightning.pytorch.strategies.ModelParallelStrategy, init_args: {data_parallel_size: 1, tensor_parallel_size: 1}},\n"
        "  callbacks: [{class_path: lightning_automodel.callbacks.LoRA}]}\n"
    )
    assert ModelParallelStrategy  # the strategy the YAML names
    assert main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "cannot run under FSDP2" in err[-1] and err[-1].startswith("lightning-automodel: error:")


@pytest.mark.multiprocess
def test_two_rank_ddp_lora_and_qlora(tmp_path):
    pytest.importorskip("bitsandbytes")
    from distributed import run_torchrun

    proc = run_torchrun("job_lora.py", str(tmp_path), "ddp", nproc=2, timeout=400)
    assert "OK job_lora ddp" in proc.stderr


@pytest.mark.multiprocess
def test_two_rank_fsdp2_users_module_calls_prepare_before_sharding(tmp_path):
    from distributed import run_torchrun

    proc = run_torchrun("job_lora.py", str(tmp_path), "user", nproc=2, timeout=400)
    assert "OK job_lora user" in proc.stderr
