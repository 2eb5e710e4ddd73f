"""lightning-automodel: NeMo AutoModel's model utilities for Lightning on FSDP2 (Lightning loads lazily)."""

from __future__ import annotations

import importlib
from typing import Any

from lightning_automodel.core.logs import show_info_without_config

__version__ = "0.1.0"

show_info_without_config()  # the package's INFO lines show without a logging configuration, once with one

_CALLBACKS = ("ParameterFreezing", "FreezeDeadParameters", "CastMixedDtypeToBF16", "TiedLMHead", "THDSqueeze", "ParameterSummary")
_LAZY = {
    **dict.fromkeys(_CALLBACKS, "lightning_automodel.callbacks"),
    "HFCausalLM": "lightning_automodel.models",
    "SFTDataModule": "lightning_automodel.data",
    "PackedSequenceCollator": "lightning_automodel.data",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_automodel' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
