"""Case 4: AdamW state bytes after freezing a VLM's vision tower, against the ideal and no freezing."""

from __future__ import annotations

import sys

import torch

from benchmarks.harness import CaseResult, Row
from lightning_automodel.core.freezing import apply_parameter_freezing


def state_bytes(model, freeze: bool) -> tuple[int, int]:
    if freeze:
        apply_parameter_freezing(model, {"freeze_vision_tower": True})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    # An image-text batch, so the vision tower and the projector are in the graph when trainable.
    cfg = model.config
    patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    text = torch.randint(0, 200, (2, 16))
    ids = torch.cat([torch.full((2, patches), cfg.image_token_index), text], dim=1)
    pixels = torch.randn(2, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    labels = ids.masked_fill(ids == cfg.image_token_index, -100)
    model(input_ids=ids, pixel_values=pixels, labels=labels).loss.backward()
    optimizer.step()
    used = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step" and torch.is_tensor(t))
    return used, sum(p.numel() for p in trainable)


def run(smoke: bool, repeats: int) -> list[CaseResult]:
    sys.path.insert(0, "tests")
    import tiny_models as tm

    frozen_bytes, trainable = state_bytes(tm.tiny_llava(), True)
    full_bytes, _ = state_bytes(tm.tiny_llava(), False)
    ideal = 2 * 4 * trainable
    r = CaseResult("4. AdamW state after freezing the vision tower of a tiny LLaVA", target="exactly the ideal (2 × 4 bytes × trainable elements)")
    r.rows = [Row("ours", [frozen_bytes], "bytes"), Row("ideal", [ideal], "bytes"), Row("no freezing", [full_bytes], "bytes")]
    r.met = frozen_bytes == ideal
    r.notes.append("Step counters (one scalar per parameter) are excluded; they are the same per tensor for every variant.")
    return [r]
