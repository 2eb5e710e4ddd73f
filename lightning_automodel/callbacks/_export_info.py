"""What ``lightning-automodel export`` needs, recorded in every Lightning checkpoint the callbacks see.

The model's config and where the model sits in the LightningModule, stored in the checkpoint (a JSON
string, readable with ``weights_only=True``): any LightningModule's checkpoint exports without the
original weights directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_automodel.core.discovery import find_hf_model
from lightning_automodel.core.hub_layout import EXPORT_INFO_KEY, hub_model_info


def source_directory(pl_module: pl.LightningModule) -> str | None:
    """The local directory the weights came from (for the tokenizer), when the module or config says so."""
    hparams = getattr(pl_module, "hparams", None) or {}
    candidate = hparams.get("pretrained_path") if hasattr(hparams, "get") else None
    if candidate is None:
        _, model = find_hf_model(pl_module)
        candidate = getattr(getattr(model, "config", None), "name_or_path", None) or None
    if candidate and Path(candidate).is_dir():
        return str(Path(candidate).resolve())
    return None


def record_export_info(pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Store the Hugging Face config and the model's prefix in ``checkpoint`` (no-op without a HF model)."""
    prefix, model = find_hf_model(pl_module)
    if getattr(model, "config", None) is None or not hasattr(model.config, "to_dict"):
        return
    checkpoint[EXPORT_INFO_KEY] = hub_model_info(prefix, model, source_directory(pl_module)).to_dict()
