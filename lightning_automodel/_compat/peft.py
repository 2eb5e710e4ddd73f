"""peft's LoRA layer internals (checked on peft 0.21.2): the public surface adapts a whole model; one layer's
adapter on a private copy (meta build, FSDP2 shards) needs peft's undocumented per-layer bookkeeping."""

from __future__ import annotations

from typing import Any

from torch import nn

# The per-adapter settings a ``LoraLayer`` records at injection, by the ``LoraConfig`` field each came from.
LAYER_SETTINGS = ("r", "lora_alpha", "use_rslora", "use_dora", "lora_bias")


def layer_settings(layer: nn.Module, adapter: str) -> dict[str, Any]:
    """The ``LoraConfig`` fields ``layer`` recorded for ``adapter``, plus ``fan_in_fan_out``.
    Why internal: ``LoraLayer`` keeps them as per-adapter dicts (``layer.r["default"]``); no public getter."""
    settings = {field: getattr(layer, field)[adapter] for field in LAYER_SETTINGS}
    settings["fan_in_fan_out"] = getattr(layer, "fan_in_fan_out", False)
    return settings


def layer_variant(layer: nn.Module, adapter: str) -> Any:
    """The LoRA variant object (DoRA, ...) of ``adapter`` on ``layer``, or None for plain LoRA.
    Why internal: ``LoraLayer.lora_variant`` (peft >= 0.17) is a per-adapter dict with no public accessor."""
    variants = getattr(layer, "lora_variant", None)
    return variants.get(adapter) if variants is not None else None


def create_adapter(layer: nn.Module, adapter: str, config: Any) -> None:
    """Create and initialize ``adapter`` on ``layer`` with peft's own init. Why internal: ``update_layer`` is what
    ``inject_adapter_in_model`` runs per layer; the public entry points adapt a whole model."""
    layer.update_layer(adapter, config.r, lora_alpha=config.lora_alpha, config=config)
