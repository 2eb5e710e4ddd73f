"""Training precision is the user's choice, never the config's; the FSDP2 layout; tensor parallel refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from distributed import run_torchrun
from lightning_automodel import HFCausalLM
from tiny_models import build, tiny_config


def _bf16_checkpoint(path, fp32_norms: bool = False):
    model = build(tiny_config("llama", vocab_size=260, dtype="bfloat16"), seed=0).to(torch.bfloat16)
    model.save_pretrained(path)
    if fp32_norms:
        state = load_file(path / "model.safetensors")
        for key in [k for k in state if k.endswith("norm.weight")]:
            state[key] = state[key].float()
        save_file(state, path / "model.safetensors")
    return path


@pytest.mark.multiprocess
def test_bf16_checkpoint_trains_in_fp32_under_fsdp2(tmp_path):
    run_torchrun("job_precision.py", "fp32", str(_bf16_checkpoint(tmp_path / "ckpt")), str(tmp_path / "out"), timeout=600)


@pytest.mark.multiprocess
def test_bf16_weights_keep_checkpoint_fp32_tensors(tmp_path):
    run_torchrun("job_precision.py", "bf16", str(_bf16_checkpoint(tmp_path / "ckpt", fp32_norms=True)), str(tmp_path / "out"), timeout=600)


def test_single_device_precision(tmp_path):
    path = _bf16_checkpoint(tmp_path / "ckpt", fp32_norms=True)
    default = HFCausalLM(pretrained_path=str(path))
    default.configure_model()
    assert {p.dtype for p in default.model.parameters()} == {torch.float32}
    asked = HFCausalLM(pretrained_path=str(path), weights_dtype="bfloat16")
    asked.configure_model()
    for name, p in asked.model.named_parameters():
        assert p.dtype == (torch.float32 if name.endswith("norm.weight") else torch.bfloat16), name
    stored = load_file(path / "model.safetensors")
    assert torch.equal(asked.model.model.layers[0].mlp.up_proj.weight, stored["model.layers.0.mlp.up_proj.weight"])


class _Mesh:
    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __getitem__(self, name):
        return type("Sub", (), {"size": lambda self: 2 if name == "tensor_parallel" else 4})()


def test_tensor_parallel_is_refused_in_one_line():
    module = HFCausalLM(config=dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    module._device_mesh = _Mesh()
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2.*tensor_parallel_size: 1") as err:
        module.configure_model()
    assert "\n" not in str(err.value) and module.model is None


@pytest.mark.multiprocess
def test_cpu_offload_trains(tmp_path):
    run_torchrun("job_precision.py", "offload", str(_bf16_checkpoint(tmp_path / "ckpt")), str(tmp_path / "out"), timeout=600)


def test_offloaded_shards_stay_in_host_memory_when_the_strategy_moves_the_model():
    """Lightning's ``model.to(root_device)`` must leave offloaded shards alone (a GPU is stood in for by meta)."""
    from torch import nn

    from lightning_automodel.core.model_build import CPU_OFFLOAD_ATTR
    from lightning_automodel.strategies import AtomicModelParallelStrategy

    model = nn.Sequential(nn.Linear(4, 4))
    model.register_buffer("table", torch.ones(3))
    setattr(model[0], CPU_OFFLOAD_ATTR, True)
    strategy = AtomicModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    strategy.model = model
    strategy.parallel_devices = [torch.device("meta")]
    strategy.model_to_device()
    assert model[0].weight.device.type == "cpu" and model.table.device.type == "meta"
    setattr(model[0], CPU_OFFLOAD_ATTR, False)
    strategy.model_to_device()
    assert model[0].weight.device.type == "meta"


@pytest.mark.multiprocess
def test_activation_checkpointing_under_fsdp2_is_exact(tmp_path):
    run_torchrun("job_precision.py", "ac", str(_bf16_checkpoint(tmp_path / "ckpt")), str(tmp_path / "out"), timeout=600)


@pytest.mark.multiprocess
def test_fsdp2_job_fits_moe_and_vlm_hub_layouts(tmp_path):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    # vocab 260: the byte tokenizer's ids must fit the embedding
    build(tiny_config("mixtral", num_local_experts=3, num_experts_per_tok=2, vocab_size=260), seed=1).save_pretrained(tmp_path / "hub" / "mixtral")
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8)
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=260, max_position_embeddings=256)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=259)).save_pretrained(tmp_path / "hub" / "llava")
    run_torchrun("job_precision.py", "layouts", str(tmp_path / "hub"), str(tmp_path / "out"), timeout=600)
