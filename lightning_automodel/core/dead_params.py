"""Dead parameters: trainable tensors that can never receive a gradient.

A parameter that gets no gradient gets no lazy optimizer state, so a sharded (DCP) checkpoint omits
it and a resume fails with ``Missing key in checkpoint state_dict: optim.state.<name>.step``. Known
cases get a rule; every rule runs in one pass over the parameters:

* Gemma-style KV sharing: the last ``num_kv_shared_layers`` decoder layers reuse K/V from earlier
  layers, so their ``k_proj``/``v_proj``/``k_norm``/``v_norm`` are dead. Only the *text decoder's*
  layers are touched (a vision encoder's ``layers.N.self_attn.k_proj`` is alive).
* DeepSeek V4 compressor indexer and MiniMax M3 indexer: they only feed ``topk(...).indices``,
  which is not differentiable.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn

from lightning_automodel.core.discovery import text_decoder_layers_path
from lightning_automodel.core.naming import canonical_named_parameters, unique_named_parameters

logger = logging.getLogger(__name__)

Matcher = Callable[[str], bool]


@dataclass(frozen=True)
class DeadParameterRule:
    """A named rule that recognises parameters which can never receive a gradient in one model family.

    ``rule.bind(model)`` resolves the model-specific part once (model type, which layers share K/V)
    and returns a bound rule (or None when it does not apply) whose ``matches(canonical_name)`` is a
    cheap per-parameter test: one pass over the parameters serves every rule.
    """

    name: str  # label reported for the parameters the rule freezes ("kv_sharing")
    binder: Callable[[nn.Module], Matcher | None]  # model -> matcher, None when the rule does not apply
    matcher: Matcher | None = field(default=None, compare=False, repr=False)

    def bind(self, model: nn.Module) -> DeadParameterRule | None:
        """This rule bound to ``model``, or None when it does not apply to it."""
        matcher = self.binder(model)
        return None if matcher is None else replace(self, matcher=matcher)

    def applies(self, model: nn.Module) -> bool:
        """Whether the rule applies to ``model`` (its family, and something is actually dead)."""
        return self.binder(model) is not None

    def matches(self, canonical_param_name: str) -> bool:
        """Whether a canonical parameter name is dead under this rule; needs a bound rule."""
        if self.matcher is None:
            raise RuntimeError(
                f"Dead-parameter rule {self.name!r} is not bound to a model; call `rule.bind(model)` and use "
                "the rule it returns."
            )
        return self.matcher(canonical_param_name)


def _model_types(model: nn.Module) -> tuple[str, ...]:
    config = getattr(model, "config", None)
    types = (getattr(config, "model_type", None), getattr(getattr(config, "text_config", None), "model_type", None))
    return tuple(str(t) for t in types if t)


def _bind_kv_sharing(model: nn.Module) -> Matcher | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = getattr(config, "text_config", None) or config
    shared = int(getattr(text_config, "num_kv_shared_layers", 0) or 0)
    total = int(getattr(text_config, "num_hidden_layers", 0) or 0)
    if shared <= 0 or total <= 0:
        return None
    first_shared = total - shared
    layers_path = text_decoder_layers_path(model, total)
    if layers_path is None:
        return None
    pattern = re.compile(rf"^{re.escape(layers_path)}\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm|v_norm)(\.|$)")

    def matches(name: str) -> bool:
        match = pattern.match(name)
        return match is not None and int(match.group(1)) >= first_shared

    return matches


def _bind_deepseek_v4_indexer(model: nn.Module) -> Matcher | None:
    if "deepseek_v4" not in _model_types(model):
        return None
    return lambda name: ".self_attn.compressor.indexer." in name


def _bind_minimax_m3_indexer(model: nn.Module) -> Matcher | None:
    if not any(t.startswith("minimax_m3") for t in _model_types(model)):
        return None
    return lambda name: ".self_attn.indexer." in name


KV_SHARING = DeadParameterRule("kv_sharing", _bind_kv_sharing)
DEEPSEEK_V4_INDEXER = DeadParameterRule("deepseek_v4_indexer", _bind_deepseek_v4_indexer)
MINIMAX_M3_INDEXER = DeadParameterRule("minimax_m3_indexer", _bind_minimax_m3_indexer)
DEAD_PARAMETER_RULES: tuple[DeadParameterRule, ...] = (KV_SHARING, DEEPSEEK_V4_INDEXER, MINIMAX_M3_INDEXER)


def _dead(model: nn.Module, rules: tuple[DeadParameterRule, ...]) -> list[tuple[str, str, nn.Parameter]]:
    if getattr(model, "config", None) is None:
        return []  # every rule is keyed on the model config
    bound = [b for rule in rules if (b := rule.bind(model)) is not None]
    if not bound:
        return []
    dead = []
    for name, param in unique_named_parameters(model):  # one pass for every rule
        for rule in bound:
            if rule.matches(name):
                dead.append((name, rule.name, param))
                break
    return dead


def find_dead_parameters(
    model: nn.Module, rules: tuple[DeadParameterRule, ...] = DEAD_PARAMETER_RULES
) -> dict[str, str]:
    """Canonical name -> rule name for every parameter a rule declares dead (one pass)."""
    return {name: rule for name, rule, _ in _dead(model, rules)}


def freeze_dead_parameters(
    model: nn.Module, rules: tuple[DeadParameterRule, ...] = DEAD_PARAMETER_RULES
) -> dict[str, str]:
    """Freeze every dead parameter; returns canonical name -> rule name."""
    dead = _dead(model, rules)
    for _, _, param in dead:
        param.requires_grad_(False)
    logger.debug("Froze %d dead parameter tensors.", len(dead))  # the callback says it, once per job
    return {name: rule for name, rule, _ in dead}


def freeze_unused_kv_sharing_params(model: nn.Module) -> int:
    """Freeze K/V projections and norms of KV-shared text-decoder layers; returns the count."""
    frozen = freeze_dead_parameters(model, (KV_SHARING,))
    if frozen:
        text_config = getattr(model.config, "text_config", None) or model.config
        total, shared = text_config.num_hidden_layers, text_config.num_kv_shared_layers
        logger.info(
            "Froze %d dead KV-sharing parameters in layers %d-%d (num_kv_shared_layers=%d).",
            len(frozen), total - shared, total - 1, shared,
        )
    return len(frozen)


def freeze_deepseek_v4_indexer_params(model: nn.Module) -> int:
    """Freeze DeepSeek V4 compressor-indexer parameters; returns the count."""
    return len(freeze_dead_parameters(model, (DEEPSEEK_V4_INDEXER,)))


def freeze_minimax_m3_indexer_params(model: nn.Module) -> int:
    """Freeze MiniMax M3 sparse-attention indexer parameters; returns the count."""
    return len(freeze_dead_parameters(model, (MINIMAX_M3_INDEXER,)))


def find_parameters_without_grad(model: nn.Module) -> list[str]:
    """Canonical names of trainable parameters whose ``.grad`` is None (after a backward)."""
    return [name for name, p in canonical_named_parameters(model) if p.requires_grad and p.grad is None]
