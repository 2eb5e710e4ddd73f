"""Loading checkpoints that omit a tied ``lm_head.weight`` (HF tied checkpoints, some exporters).

Full ``.ckpt`` files on one device or DDP: a wrapper on the LightningModule's ``on_load_checkpoint``
(which runs before the weights load) adds the missing key from the embedding.

Under ``ModelParallelStrategy`` the strategy loads the module before any hook and fails on the missing
key. When head and embedding are one Parameter in the model and the checkpoint has the embedding,
:func:`tied_head_detached` unregisters the head for the duration of the load and puts the same
Parameter back afterwards. Every other missing key still fails as before.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

from torch import nn

from lightning_automodel.core.tied_head import (
    get_lm_head_weight_and_name,
    get_tied_lm_head_source_names,
    is_tied_word_embeddings,
    fill_missing_tied_lm_head,
)

log = logging.getLogger(__name__)

_STATE_KEY = "state_dict"  # the key ModelParallelStrategy stores the module under


def fill_missing_tied_head_prefixed(state_dict: MutableMapping[str, Any], model: nn.Module, prefix: str) -> bool:
    """``fill_missing_tied_lm_head`` on a state dict whose keys carry ``prefix`` (``"model."``)."""
    view = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    before = set(view)
    if not fill_missing_tied_lm_head(view, model):
        return False
    for key in set(view) - before:
        state_dict[prefix + key] = view[key]
    return True


def missing_tied_head_keys(stored: set[str], model: nn.Module, prefix: str) -> tuple[str, str] | None:
    """``(head_key, source_key)`` as stored in a DCP checkpoint when the head is missing but its source is there."""
    if not is_tied_word_embeddings(model):
        return None
    _, head_name = get_lm_head_weight_and_name(model)
    if head_name is None:
        return None
    head_key = f"{_STATE_KEY}.{prefix}{head_name}"
    if head_key in stored:
        return None
    for source in get_tied_lm_head_source_names(model, head_name):
        source_key = f"{_STATE_KEY}.{prefix}{source}"
        if source_key in stored:
            return head_key, source_key
    return None


def checkpoint_keys(path: Path) -> set[str] | None:
    """The keys a Lightning checkpoint stores, DCP-style (``state_dict.<name>``), without loading tensors
    (restricted readers only); ``None`` when unreadable (Lightning's own load then reports it)."""
    from lightning_automodel.core.training_checkpoint_reader import CheckpointReadError, SafeFileSystemReader, safe_torch_load

    try:
        if path.is_dir():
            return set(SafeFileSystemReader(path).read_metadata().state_dict_metadata)
        if path.is_file():
            checkpoint = safe_torch_load(path, mmap=True)
            state = checkpoint.get(_STATE_KEY) if isinstance(checkpoint, dict) else None
            return {f"{_STATE_KEY}.{k}" for k in state} if isinstance(state, dict) else None
    except CheckpointReadError:
        return None
    return None


@contextlib.contextmanager
def tied_head_detached(model: nn.Module, head_name: str, source_name: str) -> Iterator[bool]:
    """Within the block, ``model`` has no ``head_name`` parameter if it is the same object as ``source_name``'s;
    yields whether it detached it (distinct tensors: the head must be loaded, a missing key is the right error)."""
    head = model.get_parameter(head_name)
    if head is not model.get_parameter(source_name):
        yield False
        return
    owner_name, _, attr = head_name.rpartition(".")
    owner = model.get_submodule(owner_name)
    delattr(owner, attr)
    try:
        yield True
    finally:
        owner.register_parameter(attr, head)
