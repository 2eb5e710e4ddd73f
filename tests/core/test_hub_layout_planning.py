"""Hub-layout planning walks the model once (issue 18 item 3), and plans what transformers reverts.

On the code before, every conversion group called ``revert_weight_conversion``, which walks every
module to find the conversion rules: planning was quadratic in depth (160 layers: 29 s).
"""

from __future__ import annotations

import pytest
import torch
import transformers.conversion_mapping as conversion_mapping
from transformers import AutoConfig
from transformers.core_model_loading import revert_weight_conversion

from lightning_automodel.core.hub_layout import plan_hub_layout
from lightning_automodel.core.model_build import build_meta_model


def _meta_model(model_type: str, layers: int) -> torch.nn.Module:
    extra = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16} if "moe" in model_type else {}
    config = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=8, vocab_size=128, num_hidden_layers=layers, **extra)
    return build_meta_model(config, "causal_lm")


def _specs(model: torch.nn.Module) -> dict:
    return {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_planning_finds_the_conversion_rules_once_per_model(model_type, monkeypatch):
    model = _meta_model(model_type, layers=6)
    calls = []
    original = conversion_mapping.get_model_conversion_mapping

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(conversion_mapping, "get_model_conversion_mapping", counting)
    layout = plan_hub_layout(model, _specs(model))
    assert len(layout.groups) > 20
    assert len(calls) <= 1, f"{len(calls)} walks of the model for {len(layout.groups)} groups"
    plan_hub_layout(model, _specs(model))  # a second save of the same model
    assert len(calls) <= 1


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_planned_layout_is_transformers_whole_state_reversion(model_type):
    model = _meta_model(model_type, layers=3)
    layout = plan_hub_layout(model, _specs(model))
    whole = revert_weight_conversion(model, dict(model.state_dict()))
    expected = {name: tuple((t[0] if isinstance(t, list) else t).shape) for name, t in whole.items()}
    planned = {t.name: t.shape for g in layout.groups for t in g.outputs}
    assert planned == expected
    if model_type == "qwen3_moe":  # fused experts really were split per expert
        assert any(".experts.3." in name for name in planned)
    assert "_weight_conversions" not in model.__dict__  # the attribute set for each call is removed again
