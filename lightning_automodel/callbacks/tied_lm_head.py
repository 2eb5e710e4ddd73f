"""Keep a tied LM head tied: after building or sharding, and across loads of checkpoints that omit it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_automodel._compat.lightning import callback_state_key
from lightning_automodel.callbacks._lifecycle import ModelSurgeryCallback
from lightning_automodel.core.discovery import find_hf_model
from lightning_automodel.core.logs import rank_zero_logger
from lightning_automodel.core.tied_head import (
    diagnose_tie,
    ensure_tied_lm_head,
    fill_missing_tied_lm_head,
    get_lm_head_weight_and_name,
    get_tied_lm_head_source_names,
    is_tied_word_embeddings,
)
from lightning_automodel.core.training_checkpoint_reader import CheckpointReadError, safe_torch_load
from lightning_automodel.strategies import dcp_stored_keys

log = rank_zero_logger(__name__)  # one line per job: rank 0's


def _stored_names(path: Path, prefix: str) -> set[str] | None:
    """The module names a checkpoint stores under ``state_dict.<prefix>``, without loading a tensor; None when unreadable."""
    try:
        if path.is_dir():
            keys = {k.removeprefix("state_dict.") for k in dcp_stored_keys(path) if k.startswith("state_dict.")}
        elif path.is_file():
            checkpoint = safe_torch_load(path, mmap=True)
            state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
            keys = set(state) if isinstance(state, dict) else set()
        else:
            return None
    except CheckpointReadError:
        return None  # Lightning's own load reports it
    return {k.removeprefix(prefix) for k in keys if k.startswith(prefix)}


def _missing_tied_head(stored: set[str], model: nn.Module) -> tuple[str, str] | None:
    """``(head, source)`` names when the checkpoint lacks the configured-tied head but has a source for it."""
    _, head = get_lm_head_weight_and_name(model)
    if not is_tied_word_embeddings(model) or head is None or head in stored:
        return None
    return next(((head, source) for source in get_tied_lm_head_source_names(model, head) if source in stored), None)


@contextlib.contextmanager
def _head_detached(model: nn.Module, head_name: str, source_name: str) -> Iterator[bool]:
    """Unregister ``head_name`` within the block if it is ``source_name``'s Parameter; yields whether it did
    (a distinct head must load: a missing key is then the right error)."""
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


class TiedLMHead(ModelSurgeryCallback):
    """Re-tie the LM head to the input embedding when the config says tied, and load checkpoints without it.

    A broken alias (meta init plus ``to_empty``) is repaired before the optimizer exists; a checkpoint that omits
    ``lm_head.weight`` loads (``.ckpt`` or DCP, any strategy), and the tie is verified after loading.

    Args:
        strict: raise (instead of warning) when the config says tied but the head cannot be (e.g. another shape).
    """

    surgery_order: ClassVar[int] = 40

    def __init__(self, strict: bool = False) -> None:
        super().__init__()
        self.strict = strict
        self.tied = False

    @property
    @override
    def state_key(self) -> str:
        return callback_state_key(self, strict=self.strict)

    def _tie(self, model: nn.Module, when: str) -> None:
        self.tied = ensure_tied_lm_head(model)
        status = diagnose_tie(model)
        if status.config_tied and not self.tied:
            message = f"TiedLMHead ({when}): the LM head cannot be tied: {status.reason}."
            if self.strict:
                raise MisconfigurationException(message)
            rank_zero_warn(message)

    @override
    def apply_surgery(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module) -> None:
        self._tie(model, "after build")

    @override
    def around_checkpoint_load(self, trainer: pl.Trainer, checkpoint_path: Any, load: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        prefix, model = find_hf_model(trainer.lightning_module)
        if not isinstance(trainer.strategy, ModelParallelStrategy):
            # The weights load later from the dict `load` returns: add the missing head to it, from the embedding.
            checkpoint = load()
            state_dict = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
            if isinstance(state_dict, dict):
                view = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
                if fill_missing_tied_lm_head(view, model):
                    state_dict.update({prefix + k: v for k, v in view.items() if prefix + k not in state_dict})
                    log.info("TiedLMHead: the checkpoint has no lm_head.weight; loaded it from the embedding.")
            return checkpoint
        # ModelParallelStrategy loads in `load` and fails on the missing key: a head aliasing the embedding is
        # unregistered for the load (any other missing key still fails).
        stored = _stored_names(Path(checkpoint_path), prefix)
        missing = _missing_tied_head(stored, model) if stored is not None else None
        if missing is None:
            return load()
        with _head_detached(model, *missing) as detached:
            if detached:
                log.info(f"TiedLMHead: state_dict.{prefix}{missing[0]} is not in the checkpoint; loading it from state_dict.{prefix}{missing[1]}.")
            return load()

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._tie(find_hf_model(pl_module)[1], "after checkpoint load")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        status = diagnose_tie(find_hf_model(pl_module)[1])
        if status.config_tied and not status.locally_tied:
            rank_zero_warn(f"TiedLMHead: the LM head is not tied at train start: {status.reason}.")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"tied": self.tied}
