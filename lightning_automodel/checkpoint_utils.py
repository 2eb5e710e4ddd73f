"""Drop-in for ``nemo_automodel.components.checkpoint.utils``; ``_get_checkpoint_tensor_dtypes`` reads local
headers only and fails at once, offline, for a name not on local disk."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_automodel.core.hf_weight_files import (
    checkpoint_tensor_dtypes,
    estimate_state_dict_bytes,
    estimate_tensor_bytes,
    format_bytes,
    format_output_file_count,
    get_safetensors_index_total_size,
)
from lightning_automodel.core.distributed import get_rank_safe, get_world_size_safe, is_rank_0
from lightning_automodel.core.naming import canonical_name as _normalize_param_name, get_module_by_canonical_name
from lightning_automodel.core.tied_head import (
    ensure_tied_lm_head,
    fill_missing_tied_lm_head as materialize_missing_tied_lm_head,  # the reference name; "materialize" here means "fill in"
    get_input_embeddings_weight_and_name,
    get_lm_head_weight_and_name,
    get_tied_lm_head_source_names,
    has_local_tied_lm_head,
    is_tied_word_embeddings,
    same_tensor_storage as _same_tensor_storage,
)
from lightning_automodel.model_utils import resolve_trust_remote_code

__all__ = [
    "_get_checkpoint_tensor_dtypes", "_get_module_by_normalized_name", "_normalize_param_name",
    "_same_tensor_storage", "ensure_tied_lm_head", "estimate_state_dict_bytes", "estimate_tensor_bytes",
    "format_bytes", "format_output_file_count", "get_input_embeddings_weight_and_name",
    "get_lm_head_weight_and_name", "get_rank_safe", "get_safetensors_index_total_size",
    "get_tied_lm_head_source_names", "get_world_size_safe", "has_local_tied_lm_head", "is_rank_0",
    "is_tied_word_embeddings", "materialize_missing_tied_lm_head", "resolve_trust_remote_code",
]


def _get_checkpoint_tensor_dtypes(
    pretrained_model_name_or_path: str, hf_config: Any = None, load_kwargs: Mapping[str, Any] | None = None
) -> dict[str, torch.dtype]:
    """Tensor name -> dtype of a local checkpoint, from headers only. ``hf_config`` is accepted for compatibility."""
    return checkpoint_tensor_dtypes(pretrained_model_name_or_path, load_kwargs)


def _get_module_by_normalized_name(model: nn.Module, normalized_module_name: str) -> nn.Module | None:
    """The first (outermost) module whose canonical name is ``normalized_module_name``, as the reference."""
    return get_module_by_canonical_name(model, normalized_module_name, outermost=True)
