"""Building Hugging Face models from a local directory or an inline config, offline, the FSDP2 way.

No Lightning here: the LightningModule calls these. A model is built with its parameters on the meta
device (buffers such as RoPE ``inv_freq`` are real), sharded per decoder layer, materialized, and only
then given its weights, so no rank ever holds a full unsharded copy in parameters.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lightning_automodel.core.checkpoint_files import OfflineCheckpointError, resolve_checkpoint_files
from lightning_automodel.core.discovery import text_decoder_layers_path
from lightning_automodel.core.init import init_empty_weights
from lightning_automodel.core.naming import get_module_by_canonical_name
from lightning_automodel.core.tied_head import (
    get_input_embeddings_weight_and_name,
    has_local_tied_lm_head,
    is_tied_word_embeddings,
    materialize_missing_tied_lm_head,
)

log = logging.getLogger(__name__)

ModelClass = Literal["auto", "causal_lm", "image_text_to_text"]


def check_local_model_dir(path: str | os.PathLike[str]) -> Path:
    """A local Hugging Face directory with a config and weights, or a clear error (we never download)."""
    root = Path(path)
    if not root.exists():
        looks_like_hub = "/" in str(path) and not str(path).startswith((".", "/", "~"))
        hint = (
            " It looks like a hub name: lightning-automodel runs offline, so download it once "
            "(`hf download NAME --local-dir DIR`) and pass DIR."
            if looks_like_hub
            else ""
        )
        raise OfflineCheckpointError(f"Model directory {str(path)!r} does not exist.{hint}")
    if not root.is_dir():
        raise NotADirectoryError(f"pretrained_path {str(path)!r} is a file; pass the model's directory.")
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root} has no config.json: it is not a Hugging Face model directory, or it is half-written.")
    resolve_checkpoint_files(root)  # raises for missing or incomplete weights
    return root


def inline_config(config: Mapping[str, Any]) -> PretrainedConfig:
    """``{"model_type": "llama", "hidden_size": 64, ...}`` -> a config; unknown keys are an error."""
    values = dict(config)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise ValueError("The inline model config needs a `model_type` (e.g. llama, qwen3, gemma3_text).")
    try:
        default = AutoConfig.for_model(model_type)
    except ValueError as exc:
        raise ValueError(f"Unknown model_type {model_type!r} in the inline model config: {exc}") from None
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {})) | set(vars(default))
    nested = {"text_config", "vision_config", "audio_config"}
    unknown = sorted(k for k in values if k not in known and k not in nested)
    if unknown:
        hints = {k: difflib.get_close_matches(k, sorted(known), n=1) for k in unknown}
        detail = ", ".join(f"{k!r}" + (f" (did you mean {v[0]!r}?)" if v else "") for k, v in hints.items())
        raise ValueError(f"The inline {model_type} config has unknown key(s): {detail}.")
    return AutoConfig.for_model(model_type, **values)


def model_class_for(config: PretrainedConfig, model_class: ModelClass = "auto"):
    if model_class == "causal_lm":
        return AutoModelForCausalLM
    if model_class == "image_text_to_text" or (model_class == "auto" and getattr(config, "vision_config", None) is not None):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def build_meta_model(config: PretrainedConfig, model_class: ModelClass = "auto", **kwargs: Any) -> PreTrainedModel:
    """Parameters on meta, buffers real (RoPE tables are computed, not loaded)."""
    with init_empty_weights():
        return model_class_for(config, model_class).from_config(config, **kwargs)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    path = text_decoder_layers_path(model)
    layers = get_module_by_canonical_name(model, path) if path else None
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"Could not find the decoder layers of {type(model).__name__} to shard.")
    return layers


def apply_fsdp2(
    model: PreTrainedModel,
    mesh: Any,
    *,
    mixed_precision: bool = False,
    activation_checkpointing: bool = False,
) -> None:
    """Shard each decoder layer, the vision tower, the embedding with a tied head in one group, then the root.

    A tied embedding and head must share one FSDP group: FSDP2 rejects a parameter managed by two groups
    at the first forward.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    layers = decoder_layers(model)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    for attr in ("vision_tower", "visual", "vision_model", "audio_tower"):
        tower = getattr(model, attr, None) or getattr(getattr(model, "model", None), attr, None)
        if isinstance(tower, nn.Module):
            fully_shard(tower, mesh=mesh, mp_policy=policy)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if head is not None and is_tied_word_embeddings(model) and head.weight is embed.weight:
        fully_shard([embed, head], mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def load_full_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Every tensor of a local checkpoint (safetensors memory-mapped, ``.bin`` on CPU)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in resolve_checkpoint_files(path):
        if file.suffix == ".safetensors":
            state.update(load_file(str(file)))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


@torch.no_grad()
def materialize_and_load(model: PreTrainedModel, state_dict: dict[str, torch.Tensor], device: torch.device) -> None:
    """Allocate a (sharded) meta model on ``device`` and copy a full state dict into it, shard by shard.

    Each rank cuts its own shard from the full tensor (no communication). Buffers keep their computed
    values. A tied head missing from ``state_dict`` is taken from the embedding.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers() if not buf.is_meta}
    model.to_empty(device=device)
    for name, buf in model.named_buffers():
        if name in buffers:
            buf.copy_(buffers[name])
    state_dict = dict(state_dict)
    materialize_missing_tied_lm_head(state_dict, model)
    missing = []
    for name, param in model.named_parameters(remove_duplicate=False):
        key = name.replace("_checkpoint_wrapped_module.", "")
        full = state_dict.get(key)
        if full is None:
            missing.append(key)
            continue
        if tuple(full.shape) != tuple(param.shape):
            raise ValueError(f"Checkpoint tensor {key} has shape {list(full.shape)}, the model expects {list(param.shape)}.")
        full = full.to(device=device, dtype=param.dtype)
        if isinstance(param, DTensor):
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)
    if missing:
        raise KeyError(f"The checkpoint has no tensor for {missing[:5]}{' ...' if len(missing) > 5 else ''}.")


def random_state_dict(config: PretrainedConfig, model_class: ModelClass, seed: int) -> dict[str, torch.Tensor]:
    """A reproducible random init (the same on every rank) for models given as an inline config."""
    torch.manual_seed(seed)
    model = model_class_for(config, model_class).from_config(config)
    state = model.state_dict()
    _, embed_name = get_input_embeddings_weight_and_name(model)
    if has_local_tied_lm_head(model) and embed_name is not None:
        state.pop("lm_head.weight", None)
    return state
