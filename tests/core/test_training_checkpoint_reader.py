"""The core reads Lightning's checkpoint metadata as data, without importing Lightning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.data import AttributeDict

from lightning_automodel.core.training_checkpoint_reader import CheckpointReadError, read_checkpoint_metadata, safe_torch_load


class Payload:
    def __reduce__(self):  # would run code if unpickled
        return (print, ("ran",))


def test_lightning_hyper_parameters_read_as_plain_mapping(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": AttributeDict(config={"hidden_size": 8}, model_class="auto"), "state_dict": {"w": torch.ones(2)}}, path)
    assert read_checkpoint_metadata(path) == {"hyper_parameters": {"config": {"hidden_size": 8}, "model_class": "auto"}}
    assert torch.equal(safe_torch_load(path)["state_dict"]["w"], torch.ones(2))


def test_other_types_stay_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": {"x": Payload()}}, path)
    with pytest.raises(CheckpointReadError, match="evil.ckpt"):
        read_checkpoint_metadata(path)
