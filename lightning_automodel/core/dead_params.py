"""Dead parameters: trainable, never a gradient, so no optimizer state: a DCP resume fails with ``Missing key in
checkpoint state_dict: optim.state.<name>.step``. Rules: Gemma KV sharing (K/V of the last ``num_kv_shared_layers``
*text decoder* layers), DeepSeek V4 and MiniMax M3 indexers (they only feed ``topk(...).indices``)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

from torch import nn

from lightning_automodel.core.discovery import text_decoder_layers_path
from lightning_automodel.core.naming import unique_named_parameters

logger = logging.getLogger(__name__)

Matcher = Callable[[str], bool]


def _model_types(model: nn.Module) -> tuple[str, ...]:
    config = getattr(model, "config", None)
    types = (getattr(config, "model_type", None), getattr(getattr(config, "text_config", None), "model_type", None))
    return tuple(str(t) for t in types if t)


def kv_sharing_layers(model: nn.Module) -> tuple[int, int] | None:
    """``(num_hidden_layers, num_kv_shared_layers)`` of the text config when the model shares K/V across layers."""
    config = getattr(model, "config", None)
    text_config = getattr(config, "text_config", None) or config
    shared = int(getattr(text_config, "num_kv_shared_layers", 0) or 0)
    total = int(getattr(text_config, "num_hidden_layers", 0) or 0)
    return (total, shared) if shared > 0 and total > 0 else None


def _kv_sharing(model: nn.Module) -> Matcher | None:
    layers = kv_sharing_layers(model)
    layers_path = text_decoder_layers_path(model, layers[0]) if layers else None
    if layers is None or layers_path is None:
        return None
    first_shared = layers[0] - layers[1]
    pattern = re.compile(rf"^{re.escape(layers_path)}\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)(\.|$)")

    def matches(name: str) -> bool:
        match = pattern.match(name)
        return match is not None and int(match.group(1)) >= first_shared

    return matches


def _deepseek_v4_indexer(model: nn.Module) -> Matcher | None:
    if "deepseek_v4" not in _model_types(model):
        return None
    return lambda name: ".self_attn.compressor.indexer." in name


def _minimax_m3_indexer(model: nn.Module) -> Matcher | None:
    if not any(t.startswith("minimax_m3") for t in _model_types(model)):
        return None
    return lambda name: ".self_attn.indexer." in name


#: rule name -> (model -> matcher of canonical parameter names, or None when the rule does not apply)
DEAD_PARAMETER_RULES: dict[str, Callable[[nn.Module], Matcher | None]] = {
    "kv_sharing": _kv_sharing,
    "deepseek_v4_indexer": _deepseek_v4_indexer,
    "minimax_m3_indexer": _minimax_m3_indexer,
}


def _dead(model: nn.Module, rules: Iterable[str]) -> list[tuple[str, str, nn.Parameter]]:
    if getattr(model, "config", None) is None:
        return []  # every rule is keyed on the model config
    bound = [(rule, matcher) for rule in rules if (matcher := DEAD_PARAMETER_RULES[rule](model)) is not None]
    if not bound:
        return []
    dead = []
    for name, param in unique_named_parameters(model):  # one pass for every rule
        rule = next((rule for rule, matches in bound if matches(name)), None)
        if rule is not None:
            dead.append((name, rule, param))
    return dead


def find_dead_parameters(model: nn.Module, rules: Iterable[str] = tuple(DEAD_PARAMETER_RULES)) -> dict[str, str]:
    """Canonical name -> rule name for every parameter a rule (by name) declares dead."""
    return {name: rule for name, rule, _ in _dead(model, rules)}


def freeze_dead_parameters(model: nn.Module, rules: Iterable[str] = tuple(DEAD_PARAMETER_RULES)) -> dict[str, str]:
    """Freeze every dead parameter; returns canonical name -> rule name."""
    dead = _dead(model, rules)
    for _, _, param in dead:
        param.requires_grad_(False)
    logger.debug("Froze %d dead parameter tensors.", len(dead))  # the callback says it, once per job
    return {name: rule for name, rule, _ in dead}
