"""How LoRA adapter parameters are named, shared by the loader (``sharded_load``) and ``lora`` without a circle.

peft keeps the adapted ``nn.Linear`` as ``base_layer`` and adds ``lora_A.<adapter>`` / ``lora_B.<adapter>``.
"""

from __future__ import annotations

ADAPTER_NAME = "default"
BASE_LAYER = "base_layer"


def is_adapter_name(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def base_checkpoint_name(name: str) -> str:
    """The name the un-adapted model's checkpoint uses for ``name`` (``q_proj.base_layer.weight`` -> ``q_proj.weight``)."""
    if f".{BASE_LAYER}." not in f".{name}.":
        return name
    return ".".join(part for part in name.split(".") if part != BASE_LAYER)
