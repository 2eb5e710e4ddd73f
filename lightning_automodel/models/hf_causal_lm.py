"""A LightningModule that fine-tunes any Hugging Face causal LM (or image-text model) on FSDP2."""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from lightning_automodel.callbacks._lifecycle import attached_trainer, prepare_before_sharding
from lightning_automodel.core.dtypes import dtype_from_name
from lightning_automodel.core.forward_signature import filter_forward_kwargs
from lightning_automodel.core.hub_layout import EXPORT_INFO_KEY, hub_model_info
from lightning_automodel.core.init import init_weights_by_module
from lightning_automodel.core.lora import adapted_modules, initialize_adapters
from lightning_automodel.core.sharded_load import CheckpointReader, load_checkpoint_into, plan_checkpoint_load
from lightning_automodel.core.tied_head import ensure_tied_lm_head
from lightning_automodel.core.model_build import (
    ModelClass, apply_fsdp2, apply_weights_dtype, build_meta_model, check_config_json, check_local_model_dir,
    inline_config, materialize, model_class_for, tensor_parallel_refusal,
)

log = logging.getLogger(__name__)

# Batch keys that describe packing for THD kernels; Hugging Face attention takes position_ids instead.
_THD_KEYS = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen", "num_sequences", "qkv_format", "padding_mask")


def quantization_config(settings: dict[str, Any]) -> Any:
    """``transformers.BitsAndBytesConfig(**settings)``, or one clear line about what is wrong."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("quantization needs bitsandbytes: pip install 'lightning-automodel[bnb]'.") from None
    from transformers import BitsAndBytesConfig

    if not isinstance(settings, dict):
        raise ValueError(f"quantization must be a mapping of BitsAndBytesConfig arguments; got {settings!r}.")
    known = [name for name in inspect.signature(BitsAndBytesConfig.__init__).parameters if name not in ("self", "kwargs")]
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            raise ValueError(f"quantization: unknown BitsAndBytesConfig argument {key!r}{f' (did you mean {close[0]!r}?)' if close else ''}.")
    try:
        config = BitsAndBytesConfig(**settings)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"quantization: {' '.join(str(exc).split())}") from None
    if not (config.load_in_4bit or config.load_in_8bit):
        raise ValueError("quantization: set load_in_4bit: true (QLoRA) or load_in_8bit: true.")
    return config


def initialize_lora_adapters(pl_module: pl.LightningModule, model: nn.Module, seed: int) -> None:
    """Initialize the model's LoRA adapters, if any, as the running Trainer's LoRA callback configures them."""
    from lightning_automodel.callbacks.lora import LoRA

    if not adapted_modules(model):
        return
    trainer = attached_trainer(pl_module)
    callback = next((cb for cb in trainer.callbacks if isinstance(cb, LoRA)), None) if trainer is not None else None
    initialize_adapters(model, seed, getattr(callback.config if callback is not None else None, "init_lora_weights", True))


class HFCausalLM(pl.LightningModule):
    """Fine-tune a Hugging Face causal LM the FSDP2 way.

    ``configure_model`` builds on meta and checks the checkpoint's layout before any allocation; under
    ``ModelParallelStrategy`` FSDP2 shards it. Parameters and AdamW state are fp32 unless ``weights_dtype`` says
    otherwise (bf16 master weights silently stall a fine-tune, so a config's own ``dtype`` never decides it).

    Args:
        pretrained_path: a local Hugging Face directory (config.json, safetensors, tokenizer).
        config: an inline config for random init, e.g. ``{model_type: llama, hidden_size: 128, ...}``.
        model_class: ``auto`` picks the image-text class when the config has a vision config.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warmup steps (0: constant learning rate).
        betas: AdamW betas.
        mixed_precision: ``bf16``: FSDP2 computes in bf16, reduces in fp32 (no FSDP2: ``precision: bf16-mixed``).
        weights_dtype: dtype of the parameters and AdamW state (``bfloat16``: half the memory, small updates may round).
        activation_checkpointing: recompute each decoder layer in backward.
        cpu_offload: FSDP2 keeps sharded parameters, gradients and optimizer state in host memory.
        trust_remote_code: allow model code from the model directory.
        seed: seed of the random init for inline configs (the same on every rank).
        quantization: QLoRA ``BitsAndBytesConfig`` arguments; needs ``pretrained_path``, bitsandbytes and ``LoRA``.
        ignore_checkpoint_keys: regexes (full match) of checkpoint tensors the model may leave unused.
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
        weights_dtype: Literal["float32", "bfloat16"] = "float32",
        activation_checkpointing: bool = False,
        cpu_offload: bool = False,
        trust_remote_code: bool = False,
        seed: int = 0,
        quantization: dict[str, Any] | None = None,
        ignore_checkpoint_keys: list[str] | None = None,
    ) -> None:
        super().__init__()
        if (pretrained_path is None) == (config is None):
            raise ValueError("HFCausalLM needs exactly one of `pretrained_path` (a local model directory) or `config` (inline).")
        if quantization is not None:
            quantization_config(quantization)  # fails here, in one line, before anything is built
            if pretrained_path is None:
                raise ValueError("quantization (QLoRA) quantizes pretrained weights: set model.pretrained_path, not model.config.")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0 (0: constant learning rate); got {warmup_steps}.")
        self.save_hyperparameters()
        self.model: PreTrainedModel | None = None

    def build_hf_config(self, weights: bool = True) -> PretrainedConfig:
        """The Hugging Face config; ``weights=False`` (``plan``) accepts a directory holding only ``config.json``."""
        hp = self.hparams
        if hp.pretrained_path is None:
            return inline_config(hp.config)
        from transformers import AutoConfig

        root = Path(hp.pretrained_path)
        if weights or not (root / "config.json").is_file():
            root = check_local_model_dir(root)  # missing (a hub name?), a file, no config.json, no weights
        else:
            check_config_json(root / "config.json")  # bounded size and depth, before transformers' json.loads
        return AutoConfig.from_pretrained(root, trust_remote_code=hp.trust_remote_code, local_files_only=True)

    def build_model(self) -> PreTrainedModel:
        """The Hugging Face model on meta, fp32, no weights, no sharding."""
        return build_meta_model(self.build_hf_config(), self.hparams.model_class, trust_remote_code=self.hparams.trust_remote_code)

    def weights_cast(self, plan: Any = None, reader: CheckpointReader | None = None) -> Callable[[nn.Module], object] | None:
        """The ``weights_dtype`` surgery step (None for float32); tensors the checkpoint stores in fp32 stay fp32."""
        weights_dtype = dtype_from_name(self.hparams.weights_dtype)
        if weights_dtype == torch.float32:
            return None
        keep = plan.targets_stored_as(reader, torch.float32) if plan is not None and reader is not None else set()
        return functools.partial(apply_weights_dtype, dtype=weights_dtype, keep_fp32=keep)

    def _configure_quantized(self) -> None:
        """QLoRA: transformers loads and quantizes the base (bitsandbytes), then LoRA adapts it in place."""
        hp = self.hparams
        if self.device_mesh is not None:
            raise ValueError(
                "quantization (QLoRA) cannot run under FSDP2: fully_shard cannot shard bitsandbytes 4-bit weights. Use "
                "DDP (each GPU holds the 4-bit base) or LoRA on bf16 weights under FSDP2 (model.weights_dtype: bfloat16)."
            )
        trainer = attached_trainer(self)
        model = model_class_for(self.build_hf_config(), hp.model_class).from_pretrained(
            check_local_model_dir(hp.pretrained_path), quantization_config=quantization_config(hp.quantization),
            dtype=dtype_from_name(hp.weights_dtype), local_files_only=True, trust_remote_code=hp.trust_remote_code,
            device_map={"": trainer.strategy.root_device if trainer is not None else torch.device("cpu")},
        )
        # from_pretrained returns eval mode and Lightning keeps it: dropout would be off while the adapters train
        model.train()
        prepare_before_sharding(self, model)
        initialize_lora_adapters(self, model, hp.seed)
        self.model = model
        self.strict_loading = False  # the frozen 4-bit base is not in checkpoints; on_load_checkpoint checks the rest

    def _check_sharding(self) -> None:
        """Refuse what FSDP2 here does not do: tensor parallelism; cpu_offload without the strategy that keeps it."""
        from lightning_automodel.strategies import AtomicModelParallelStrategy

        if self.device_mesh is None:
            if self.hparams.cpu_offload:
                raise ValueError("cpu_offload is an FSDP2 option: use ModelParallelStrategy (AtomicModelParallelStrategy) or drop it.")
            return
        mesh = self.device_mesh
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError(tensor_parallel_refusal(mesh["tensor_parallel"].size()))
        strategy = self.trainer.strategy if self.hparams.cpu_offload else None
        if strategy is not None and strategy.root_device.type != "cpu" and not isinstance(strategy, AtomicModelParallelStrategy):
            raise ValueError(
                f"cpu_offload needs lightning_automodel.strategies.AtomicModelParallelStrategy (same arguments as "
                f"{type(strategy).__name__}): Lightning's strategy would copy every offloaded shard to the device."
            )

    def configure_model(self) -> None:
        if self.model is not None:
            return  # idempotent: validate/test after fit call this again
        hp = self.hparams
        if hp.mixed_precision == "bf16" and self.device_mesh is None:
            # Only apply_fsdp2 reads it: silently training in fp32 would cost the user 2x compute unnoticed.
            trainer = attached_trainer(self)  # None: core-API use
            rank_zero_warn(
                f"model.mixed_precision: bf16 is FSDP2's compute dtype and does nothing under "
                f"{type(trainer.strategy).__name__ if trainer is not None else 'no strategy'}: use "
                "ModelParallelStrategy, or set the Trainer's precision: bf16-mixed here (and drop mixed_precision)."
            )
        if hp.get("quantization") is not None:
            return self._configure_quantized()
        self._check_sharding()
        model = self.build_model()
        reader = CheckpointReader(hp.pretrained_path) if hp.pretrained_path is not None else None
        try:
            # Checked on meta: a missing tensor or a shape mismatch fails here, on every rank, before any allocation.
            plan = plan_checkpoint_load(model, reader, hp.get("ignore_checkpoint_keys") or ()) if reader is not None else None
            # Surgery before sharding (LoRA adapters, weights dtype) in plan's order, after the load plan:
            # the checkpoint maps onto the base weights; adapters are not in it.
            prepare_before_sharding(self, model, weights_cast=self.weights_cast(plan, reader))
            device = torch.device("cpu")  # one device / DDP: the strategy moves the module to its device afterwards
            if self.device_mesh is not None:
                apply_fsdp2(model, self.device_mesh["data_parallel"], mixed_precision=hp.mixed_precision == "bf16",
                            activation_checkpointing=hp.activation_checkpointing, cpu_offload=hp.cpu_offload)
                device = device if hp.cpu_offload else self.trainer.strategy.root_device
            materialize(model, device)
            if reader is not None:
                report = load_checkpoint_into(model, reader, plan)
                log.info("Loaded %d tensors, %.1f MiB read on this rank, in %.1f s.", report.tensors, report.bytes_read / 2**20, report.seconds)
            else:
                init_weights_by_module(model, hp.seed)
            initialize_lora_adapters(self, model, hp.seed)
        finally:
            if reader is not None:
                reader.close()
            # This frame can outlive the call (bitsandbytes logs its kernel-load failure with the exception as
            # a log argument; a handler keeping records pins every frame): nothing of the load may stay reachable.
            reader = plan = None
        if self.device_mesh is None and hp.activation_checkpointing:
            # transformers 5.x's name; older releases' gradient_checkpointing_enable warns (FutureWarning) at every start
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        ensure_tied_lm_head(model)
        self.model = model

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The Hugging Face config travels with the checkpoint: export needs no weights directory.
        if self.model is not None:
            checkpoint[EXPORT_INFO_KEY] = hub_model_info("model.", self.model, self.hparams.pretrained_path).to_dict()
        if self.hparams.get("quantization") is not None:
            # QLoRA: the frozen 4-bit base is rebuilt (deterministically) at every start; save only what trains.
            trainable = {name for name, p in self.named_parameters() if p.requires_grad}
            state = checkpoint.get("state_dict", {})
            for key in [k for k in state if k not in trainable]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.hparams.get("quantization") is None:
            return
        state = checkpoint.get("state_dict", {})
        missing = [name for name, p in self.named_parameters() if p.requires_grad and name not in state]
        if missing:
            raise ValueError(
                f"the checkpoint has no {missing[0]} ({len(missing)} trainable tensors missing): it was not saved from "
                "this QLoRA configuration (same LoRA callback and quantization)."
            )

    def forward(self, **batch: Any) -> Any:
        inputs = {k: v for k, v in batch.items() if k not in _THD_KEYS}
        return self.model(**filter_forward_kwargs(self.model, inputs), use_cache=False)

    def _logged_loss(self, batch: dict[str, Any], name: str, **log_options: Any) -> torch.Tensor:
        loss = self(**batch).loss
        if loss is None:
            raise ValueError("The model returned no loss: the batch needs `labels`.")
        self.log(name, loss, batch_size=batch["input_ids"].shape[0], **log_options)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._logged_loss(batch, "train_loss", prog_bar=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._logged_loss(batch, "val_loss", prog_bar=True, sync_dist=True)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._logged_loss(batch, "test_loss", sync_dist=True)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        if hp.warmup_steps <= 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / hp.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _text_config(self) -> PretrainedConfig:
        config = self.model.config if self.model is not None else self.build_hf_config()
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @property
    def vocab_size(self) -> int:
        return int(self._text_config().vocab_size)

    @property
    def max_positions(self) -> int:
        """``max_position_embeddings`` of the text model (0 when the config does not say)."""
        return int(getattr(self._text_config(), "max_position_embeddings", 0) or 0)
