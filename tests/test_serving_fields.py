"""Exports keep the original config's serving fields: training settings never leak into what is served."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

import tiny_models as tm
from lightning_automodel import HFCausalLM
from lightning_automodel.callbacks import HuggingFaceCheckpoint
from lightning_automodel.export import export_checkpoint


def test_use_cache_survives_training_checkpoint_and_export(tmp_path):
    source = tmp_path / "src"
    model = tm.tiny_llama()
    assert model.config.use_cache is True
    model.save_pretrained(source)
    rows = torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    data = DataLoader([{"input_ids": r, "labels": r} for r in rows], batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[HuggingFaceCheckpoint(dirpath=str(tmp_path / "hf"))])
    trainer.fit(HFCausalLM(pretrained_path=str(source)), data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    exported = export_checkpoint(tmp_path / "last.ckpt", tmp_path / "exported")
    for directory in (tmp_path / "hf" / "final", exported):
        assert json.loads((directory / "config.json").read_text())["use_cache"] is True, directory
