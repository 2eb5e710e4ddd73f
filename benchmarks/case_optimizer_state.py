"""Case 4: AdamW state bytes after freezing a VLM's vision tower, against the ideal and no freezing.

The model is a LLaVA (CLIP vision tower + projector + llama) built from a transformers config with
random weights. One real image-text step is taken, so every trainable tensor gets a gradient and
AdamW creates its state. The ideal is computed independently of any freezing code: 2 moments x
4 bytes (fp32) x every element outside ``model.vision_tower``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration

from benchmarks.harness import CaseResult, Row
from lightning_automodel.callbacks import ParameterFreezing

REF = "nemo-automodel 0.7.0 apply_parameter_freezing"


def llava(smoke: bool) -> LlavaForConditionalGeneration:
    size = 32 if smoke else 256
    vision = dict(model_type="clip_vision_model", hidden_size=size, intermediate_size=4 * size, num_hidden_layers=2 if smoke else 6,
                  num_attention_heads=4, image_size=32 if smoke else 64, patch_size=8, projection_dim=size)
    text = dict(model_type="llama", hidden_size=size, intermediate_size=4 * size, num_hidden_layers=2 if smoke else 6,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=511, vocab_size=512))


def adamw_state_bytes(model: LlavaForConditionalGeneration, freeze: Callable[[nn.Module], object] | None) -> int:
    """Bytes of AdamW moment tensors after one image-text step (step counters excluded)."""
    if freeze is not None:
        freeze(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    cfg = model.config
    side = cfg.vision_config.image_size
    patches = (side // cfg.vision_config.patch_size) ** 2
    ids = torch.cat([torch.full((2, patches), cfg.image_token_index), torch.randint(0, 500, (2, 16))], dim=1)
    labels = ids.masked_fill(ids == cfg.image_token_index, -100)
    model(input_ids=ids, pixel_values=torch.randn(2, 3, side, side), labels=labels).loss.backward()
    optimizer.step()
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for key, t in state.items() if key != "step" and torch.is_tensor(t))


def run(smoke: bool, repeats: int) -> list[CaseResult]:
    import nemo_automodel.components.utils.model_utils as ref

    logging.getLogger("lightning_automodel").setLevel(logging.WARNING)
    probe = llava(smoke)
    total = sum(p.numel() for p in probe.parameters())
    vision = sum(p.numel() for p in probe.model.vision_tower.parameters())
    del probe
    ideal = 2 * 4 * (total - vision)
    ours = adamw_state_bytes(llava(smoke), ParameterFreezing(freeze_vision_tower=True).freeze)
    theirs = adamw_state_bytes(llava(smoke), lambda m: ref.apply_parameter_freezing(m, {"freeze_vision_tower": True}))
    full = adamw_state_bytes(llava(smoke), None)
    r = CaseResult(
        f"4. AdamW state after freezing the vision tower of a LLaVA ({total / 1e6:.1f} M parameters, {vision / total:.0%} in the vision tower)",
        target="exactly the ideal (2 × 4 bytes × elements outside the vision tower)",
    )
    r.rows = [Row("ours (ParameterFreezing.freeze)", [ours], "bytes"), Row("ideal", [ideal], "bytes"),
              Row(REF, [theirs], "bytes"), Row("no freezing", [full], "bytes")]
    r.ours = r.rows[0].name
    r.met = None if smoke else ours == ideal
    r.notes.append("Deterministic (one measurement): state size depends only on which tensors are trainable. Step counters "
                   "(one scalar per tensor) are excluded. The ideal is counted from `model.vision_tower` directly, not from "
                   "any freezing code.")
    return [r]
