"""Tiny checkpoints in every on-disk layout the loader must read, written by ``save_pretrained``.

Each entry builds a random tiny model and saves it the way the hub stores it, so the files hold the
hub's names (per-expert MoE tensors, legacy VLM keys, a tied head left out), not the module's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from tiny_models import build, tiny_config, tiny_gemma3, tiny_llava


def _mixtral():
    # 3 experts on 2 ranks: FSDP2's dim-0 split is uneven (2 + 1), and vocab 255 pads the embedding.
    return build(tiny_config("mixtral", num_local_experts=3, num_experts_per_tok=2, vocab_size=255), seed=1)


def _qwen3_moe():
    return build(tiny_config("qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), seed=2)


def _llama_bf16():
    return build(tiny_config("llama"), seed=3).to(torch.bfloat16)


LAYOUTS: dict[str, tuple[Callable, dict]] = {
    "mixtral": (_mixtral, {}),
    "qwen3_moe": (_qwen3_moe, {}),
    "llava": (tiny_llava, {}),
    "gemma3_tied": (tiny_gemma3, {}),
    "llama_bf16_sharded": (_llama_bf16, {"max_shard_size": "100KB"}),
    "llama_bin": (lambda: build(tiny_config("llama"), seed=4), {"safe_serialization": False}),
}


def write_layout(name: str, root: Path) -> Path:
    """Write layout ``name`` under ``root/name`` (``.bin`` through ``torch.save``: transformers 5 saves safetensors only)."""
    factory, kwargs = LAYOUTS[name]
    model = factory()
    out = root / name
    if kwargs.get("safe_serialization") is False:
        out.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(out)
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    else:
        model.save_pretrained(out, **kwargs)
    return out
