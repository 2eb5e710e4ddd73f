"""LoRA adapters through peft, injected in place before sharding, with the base frozen."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lightning_automodel.callbacks._lifecycle import ModelSurgeryCallback, read_callback_states, saved_state
from lightning_automodel.core.distributed import digest_names
from lightning_automodel.core.logs import rank_zero_logger
from lightning_automodel.core.lora import (
    adapted_modules,
    adapter_parameter_count,
    config_to_json,
    freeze_base,
    inject_lora,
    is_adapter_name,
    lora_config,
    trainable_names,
)

log = rank_zero_logger(__name__)  # one line per job: rank 0's


def config_differences(saved: str, current: str) -> list[str]:
    """``field: value (checkpoint) vs value (this run)`` for each ``LoraConfig`` field that differs (JSON texts)."""
    before, now = json.loads(saved), json.loads(current)

    def shown(data: dict[str, Any], key: str) -> str:
        return json.dumps(data[key], sort_keys=True) if key in data else "(unset)"

    keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    return [f"{key}: {shown(before, key)} (checkpoint) vs {shown(now, key)} (this run)" for key in keys]


class LoRA(ModelSurgeryCallback):
    """Train LoRA adapters (peft) instead of the whole model.

    Adapters are injected in place by peft (``q_proj.weight`` becomes ``q_proj.base_layer.weight`` beside
    ``q_proj.lora_A.default.weight``) before FSDP2 shards the model; every other parameter is frozen (unless
    ParameterFreezing unfreezes it). A module sharding its own model calls ``prepare_before_sharding(self, model)``.

    Args:
        r: adapter rank.
        lora_alpha: scaling numerator (the update is ``lora_alpha / r · B @ A``).
        lora_dropout: dropout on the adapter input.
        target_modules: ``"all-linear"`` (every linear layer but the output head), module names or a regex.
        exclude_modules: names or a regex left out.
        **lora_kwargs: any other ``peft.LoraConfig`` field (``use_rslora``, ``lora_bias``, ...).
    """

    surgery_order: ClassVar[int] = 5

    def __init__(
        self,
        r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        exclude_modules: str | list[str] | None = None,
        **lora_kwargs: Any,
    ) -> None:
        super().__init__()
        self.config = lora_config(r, lora_alpha, lora_dropout, target_modules, exclude_modules, **lora_kwargs)
        self.adapted: list[str] = []

    def inject(self, model: nn.Module) -> dict[str, str]:
        """Inject (once) and freeze the base; returns what it froze -> rule (``plan`` calls this on meta)."""
        if not any(is_adapter_name(name) for name, _ in model.named_parameters()):
            self._trainable_before = trainable_names(model)
            self.adapted = inject_lora(model, self.config)
            log.info(
                f"LoRA: {len(self.adapted)} adapted modules, {adapter_parameter_count(model):,} adapter parameters (r={self.config.r})."
            )
        else:
            self.adapted = adapted_modules(model)
        frozen = freeze_base(model, self._trainable_before)
        self.frozen.update(frozen)
        return frozen

    @override
    def apply_before_sharding(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module) -> None:
        self.inject(model)

    @override
    def apply_surgery(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module) -> None:
        from torch.distributed.tensor import DTensor

        sharded = any(isinstance(p, DTensor) for p in model.parameters())
        if sharded and not any(is_adapter_name(name) for name, _ in model.named_parameters()):
            raise MisconfigurationException(
                "LoRA must be injected before FSDP2 shards the model: in configure_model, call "
                "lightning_automodel.callbacks.prepare_before_sharding(self, model) between the build and fully_shard "
                "(HFCausalLM does this itself)."
            )
        self.inject(model)

    @override
    def reset_run_state(self) -> None:
        super().reset_run_state()
        self._trainable_before: set[str] | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        # What export needs (the config: scaling, targets) and what identifies the adapter set.
        return {"config": config_to_json(self.config), "adapted_digest": digest_names(self.adapted), "adapted": len(self.adapted)}

    @override
    def around_checkpoint_load(self, trainer: pl.Trainer, checkpoint_path: Any, load: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        # Compare before any tensor loads: weights load before callback state (a changed r: torch's size mismatch).
        if trainer.state.fn == "fit":
            state = saved_state(read_callback_states(checkpoint_path) or {}, self.state_key)
            if state is not None:
                self._check_saved_config(state, checkpoint_path)
        return load()

    def _check_saved_config(self, state: Mapping[str, Any], checkpoint_path: Any) -> None:
        saved = state.get("config")
        if saved is None or saved == config_to_json(self.config):
            return
        differences = config_differences(saved, config_to_json(self.config)) or ["(the stored configuration cannot be compared)"]
        raise MisconfigurationException(
            f"LoRA: the checkpoint {checkpoint_path} was trained with another LoRA configuration: {'; '.join(differences)}. "
            "Resume with the checkpoint's values, or start a new fit from its weights (no ckpt_path) to train a new adapter."
        )
