"""Loading checkpoints that omit a tied ``lm_head.weight`` (HF tied checkpoints, some exporters).

Full ``.ckpt`` files: the LightningModule's ``on_load_checkpoint`` runs before the weights are loaded,
so a wrapper on it adds the missing key to ``checkpoint["state_dict"]`` from the embedding source.

Sharded (DCP) checkpoints under ``ModelParallelStrategy``: Lightning asks DCP for every key of the
model, and DCP fails hard on the missing head (``Missing key in checkpoint state_dict:
state_dict.model.lm_head.weight``). For exactly that key, and only when its embedding source is in
the checkpoint, the DCP load here leaves the head out of the request and then points it at the loaded
embedding. Every other missing key still fails as before.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_automodel.core.tied_head import (
    get_lm_head_weight_and_name,
    get_tied_lm_head_source_names,
    is_tied_word_embeddings,
    materialize_missing_tied_lm_head,
)

log = logging.getLogger(__name__)

_STATE_KEY = "state_dict"  # the key ModelParallelStrategy stores the module under


def materialize_prefixed(state_dict: MutableMapping[str, Any], model: nn.Module, prefix: str) -> bool:
    """``materialize_missing_tied_lm_head`` on a state dict whose keys carry ``prefix`` (``"model."``)."""
    view = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    before = set(view)
    if not materialize_missing_tied_lm_head(view, model):
        return False
    for key in set(view) - before:
        state_dict[prefix + key] = view[key]
    return True


def missing_tied_head_keys(checkpoint_keys: set[str], model: nn.Module, prefix: str) -> tuple[str, str] | None:
    """``(head_key, source_key)`` as stored in a DCP checkpoint when the head is missing but its source is there."""
    if not is_tied_word_embeddings(model):
        return None
    _, head_name = get_lm_head_weight_and_name(model)
    if head_name is None:
        return None
    head_key = f"{_STATE_KEY}.{prefix}{head_name}"
    if head_key in checkpoint_keys:
        return None
    for source in get_tied_lm_head_source_names(model, head_name):
        source_key = f"{_STATE_KEY}.{prefix}{source}"
        if source_key in checkpoint_keys:
            return head_key, source_key
    return None


def dcp_keys(path: Path) -> set[str]:
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


@contextlib.contextmanager
def dcp_load_without(head_key: str, source_key: str) -> Iterator[None]:
    """Within the block, Lightning's DCP module load skips ``head_key`` and aliases it to ``source_key``."""
    import lightning.fabric.strategies.model_parallel as fabric_mp

    original: Callable[..., None] = fabric_mp._distributed_checkpoint_load
    outer, head_attr = head_key.split(".", 1)
    _, source_attr = source_key.split(".", 1)

    @functools.wraps(original)
    def load(module_state: dict[str, Any], path: Path) -> None:
        inner = module_state.get(outer)
        if not isinstance(inner, dict) or head_attr not in inner or source_attr not in inner:
            return original(module_state, path)
        head = inner.pop(head_attr)
        try:
            original(module_state, path)
        finally:
            inner[head_attr] = head
        with torch.no_grad():
            source = inner[source_attr]
            if source is not head:
                head.copy_(source)
        log.info("Loaded %s from its embedding source %s.", head_key, source_key)

    fabric_mp._distributed_checkpoint_load = load
    try:
        yield
    finally:
        fabric_mp._distributed_checkpoint_load = original
