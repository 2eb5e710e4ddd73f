"""Case 10: LoRA. AdamW state against full fine-tuning and the ideal; step time against a plain peft loop.

A llama built from a transformers config (random weights). State: after one real step, the bytes of
AdamW's moment tensors (step counters excluded) with the ``LoRA`` callback's injection (r=16,
all-linear) against full fine-tuning; the ideal is computed independently: 2 moments x 4 bytes x
the adapter elements, counted from the shapes (r x in + out x r per adapted linear layer).

Step time: forward + backward + AdamW step on the same batch, ours (adapters injected in place by
``core.lora.inject_lora``) against ``peft.get_peft_model`` (the wrapper most LoRA loops use),
alternating, after warm-up.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.harness import CaseResult, Row, alternate
from lightning_automodel.core.lora import freeze_base, inject_lora, lora_config

R = 16


def llama(smoke: bool) -> LlamaForCausalLM:
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2) if smoke else dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**size, num_attention_heads=8, num_key_value_heads=4, vocab_size=2048,
                                        max_position_embeddings=512))


def ideal_adapter_elements(model: nn.Module) -> int:
    """r x in + out x r for every linear layer but the output head: from the shapes alone."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
            total += R * module.in_features + module.out_features * R
    return total


def batch(model: nn.Module, seq: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, model.config.vocab_size, (4, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def adamw_state_bytes(model: nn.Module, data: dict[str, torch.Tensor]) -> int:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**data).loss.backward()
    optimizer.step()
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step")


def ours(model: nn.Module) -> nn.Module:
    inject_lora(model, lora_config(r=R, lora_alpha=2 * R))
    freeze_base(model)
    return model


def peft_wrapped(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear"))


def step_fn(model: nn.Module, data: dict[str, torch.Tensor]):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**data).loss.backward()
        optimizer.step()

    for _ in range(2):  # warm-up: optimizer state created, kernels chosen
        step()
    return step


def run(smoke: bool, repeats: int) -> list[CaseResult]:
    seq = 32 if smoke else 256
    reference = llama(smoke)
    ideal = 2 * 4 * ideal_adapter_elements(reference)
    data = batch(reference, seq)
    full = adamw_state_bytes(llama(smoke), data)
    lora = adamw_state_bytes(ours(llama(smoke)), data)
    params = sum(p.numel() for p in reference.parameters())
    mib = 2**20
    state = CaseResult(f"10. AdamW state with LoRA (r={R}, all-linear) on a {params / 1e6:.0f}M-parameter llama" + (" (smoke)" if smoke else ""),
                       target="LoRA state equals the ideal 2 x 4 B x adapter elements")
    state.rows += [Row("ours", [lora / mib], "MiB", metric="AdamW state"), Row("ideal", [ideal / mib], "MiB", metric="AdamW state"),
                   Row("full fine-tuning", [full / mib], "MiB", metric="AdamW state")]
    state.notes.append(f"Adapter elements {ideal // 8:,} ({100 * ideal / 8 / params:.2f}% of the model); full fine-tuning keeps "
                       f"{full / lora:.0f}x the state.")
    state.met = lora == ideal

    timings = alternate({"ours": step_fn(ours(llama(smoke)), data), "peft.get_peft_model": step_fn(peft_wrapped(llama(smoke)), data)},
                        repeats=max(3, repeats * 2))
    speed = CaseResult(f"10. LoRA training step (batch 4 x {seq} tokens), in-place injection against peft.get_peft_model",
                       target="report: same peft layers, so equal within noise")
    for name, values in timings.items():
        speed.rows.append(Row(name, values, "s", metric="seconds per step"))
    return [state, speed]
