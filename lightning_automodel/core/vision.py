"""Vision-tower switches that save memory without changing results."""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)


def enable_radio_vit_fused_attn(model: nn.Module) -> int:
    """Route RADIO ViT attention through SDPA (``attn.fused_attn = True``); returns the blocks changed.

    timm's default ``fused_attn=False`` materializes a (B, H, seq, seq) tensor of several GiB per
    block at RADIO's patch counts. A model without a RADIO tower is left alone (returns 0).
    """
    vision = getattr(model, "vision_model", None) or getattr(getattr(model, "model", None), "vision_model", None)
    blocks = getattr(getattr(getattr(vision, "radio_model", None), "model", None), "blocks", None)
    if blocks is None:
        return 0
    attns = [block.attn for block in blocks if getattr(block, "attn", None) is not None]
    for attn in attns:
        attn.fused_attn = True
    if attns:
        logger.info("Enabled fused_attn on %d RADIO ViT blocks", len(attns))
    return len(attns)
