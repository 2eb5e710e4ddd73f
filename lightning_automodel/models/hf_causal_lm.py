"""A LightningModule that fine-tunes any Hugging Face causal LM (or image-text model) on FSDP2."""

from __future__ import annotations

import logging
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from transformers import PretrainedConfig, PreTrainedModel

from lightning_automodel.core.forward_signature import filter_forward_kwargs
from lightning_automodel.core.tied_head import ensure_tied_lm_head
from lightning_automodel.models.building import (
    ModelClass,
    apply_fsdp2,
    build_meta_model,
    check_local_model_dir,
    inline_config,
    load_full_state_dict,
    materialize_and_load,
    model_class_for,
    random_state_dict,
)

log = logging.getLogger(__name__)

# Batch keys that describe packing for THD kernels; Hugging Face attention takes position_ids instead.
_THD_KEYS = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen", "qkv_format", "padding_mask")


class HFCausalLM(pl.LightningModule):
    """Fine-tune a Hugging Face causal LM the FSDP2 way.

    The model is built in ``configure_model``: under ``ModelParallelStrategy`` its parameters start on
    the meta device, each decoder layer is sharded with ``fully_shard`` on the data-parallel mesh (a
    tied embedding and head in one group), and the weights are loaded into the shards. On one device
    or DDP it is built normally. The optimizer sees trainable parameters only.

    Args:
        pretrained_path: a local Hugging Face directory (config.json, safetensors, tokenizer).
        config: an inline config for random init, e.g. ``{model_type: llama, hidden_size: 128, ...}``.
        model_class: ``auto`` picks the image-text class when the config has a vision config.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warmup steps (0: constant learning rate).
        betas: AdamW betas.
        mixed_precision: ``bf16``: FSDP2 computes in bf16 and reduces in fp32 (single device: use the
            Trainer's ``precision: bf16-mixed``).
        activation_checkpointing: recompute each decoder layer in backward.
        trust_remote_code: allow model code from the model directory.
        seed: seed of the random init for inline configs (the same on every rank).
    """

    def __init__(
        self,
        pretrained_path: str | None = None,
        config: dict[str, Any] | None = None,
        model_class: ModelClass = "auto",
        learning_rate: float = 3e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        betas: tuple[float, float] = (0.9, 0.95),
        mixed_precision: Literal["none", "bf16"] = "none",
        activation_checkpointing: bool = False,
        trust_remote_code: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if (pretrained_path is None) == (config is None):
            raise ValueError("HFCausalLM needs exactly one of `pretrained_path` (a local model directory) or `config` (inline).")
        self.save_hyperparameters()
        self.model: PreTrainedModel | None = None

    # ---- building -----------------------------------------------------------------------------

    def build_hf_config(self) -> PretrainedConfig:
        hp = self.hparams
        if hp.pretrained_path is not None:
            from transformers import AutoConfig

            root = check_local_model_dir(hp.pretrained_path)
            return AutoConfig.from_pretrained(root, trust_remote_code=hp.trust_remote_code, local_files_only=True)
        return inline_config(hp.config)

    def build_model(self, device: str | torch.device = "meta") -> PreTrainedModel:
        """The Hugging Face model with no weights loaded and no sharding (``plan`` uses it on meta)."""
        config = self.build_hf_config()
        if torch.device(device).type == "meta":
            return build_meta_model(config, self.hparams.model_class, trust_remote_code=self.hparams.trust_remote_code)
        with torch.device(device):
            return model_class_for(config, self.hparams.model_class).from_config(config, trust_remote_code=self.hparams.trust_remote_code)

    def _full_state_dict(self, config: PretrainedConfig) -> dict[str, torch.Tensor]:
        if self.hparams.pretrained_path is not None:
            return load_full_state_dict(self.hparams.pretrained_path)
        return random_state_dict(config, self.hparams.model_class, self.hparams.seed)

    def configure_model(self) -> None:
        if self.model is not None:
            return  # idempotent: validate/test after fit call this again
        config = self.build_hf_config()
        hp = self.hparams
        if self.device_mesh is None:
            if hp.pretrained_path is not None:
                cls = model_class_for(config, hp.model_class)
                model = cls.from_pretrained(hp.pretrained_path, local_files_only=True, trust_remote_code=hp.trust_remote_code, dtype=torch.float32)
            else:
                torch.manual_seed(hp.seed)
                model = model_class_for(config, hp.model_class).from_config(config, trust_remote_code=hp.trust_remote_code)
            if hp.activation_checkpointing:
                model.gradient_checkpointing_enable()
        else:
            model = build_meta_model(config, hp.model_class, trust_remote_code=hp.trust_remote_code)
            apply_fsdp2(
                model,
                self.device_mesh["data_parallel"],
                mixed_precision=hp.mixed_precision == "bf16",
                activation_checkpointing=hp.activation_checkpointing,
            )
            materialize_and_load(model, self._full_state_dict(config), self.trainer.strategy.root_device)
        ensure_tied_lm_head(model)
        model.config.use_cache = False
        self.model = model

    # ---- steps --------------------------------------------------------------------------------

    def forward(self, **batch: Any) -> Any:
        inputs = {k: v for k, v in batch.items() if k not in _THD_KEYS}
        return self.model(**filter_forward_kwargs(self.model, inputs), use_cache=False)

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        out = self(**batch)
        if out.loss is None:
            raise ValueError("The model returned no loss: the batch needs `labels`.")
        return out.loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("test_loss", loss, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]
        hp = self.hparams
        optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        if hp.warmup_steps <= 0:
            return optimizer
        warmup = hp.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def vocab_size(self) -> int:
        config = self.model.config if self.model is not None else self.build_hf_config()
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(text.vocab_size)

    @property
    def max_positions(self) -> int:
        """``max_position_embeddings`` of the text model (0 when the config does not say)."""
        config = self.model.config if self.model is not None else self.build_hf_config()
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(getattr(text, "max_position_embeddings", 0) or 0)
