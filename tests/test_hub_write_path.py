"""HuggingFaceCheckpoint's one write path: a failed merged save leaves no staging directory behind, and a LoRA
save builds one meta model (the layout's), not a second one for the merge."""

from __future__ import annotations

import errno

import pytest

import lightning_automodel.core.model_build as model_build
from lightning_automodel.callbacks import HuggingFaceCheckpoint
from test_lora_merge import LLAMA, fit_lora

pytest.importorskip("peft")


def test_a_failed_merged_save_removes_its_staging_directory(tmp_path, monkeypatch):
    import safetensors.torch

    callback = HuggingFaceCheckpoint(dirpath=str(tmp_path / "hf"), save_on_train_end=False)
    t, module = fit_lora(LLAMA, callbacks=[callback], r=4, lora_alpha=8)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device (test)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)  # merged groups are written with save_file
    with pytest.raises(OSError, match="No space left"):
        callback.save(t, module, tmp_path / "hf" / "out")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == []


def test_a_lora_save_builds_one_meta_model(tmp_path, monkeypatch):
    callback = HuggingFaceCheckpoint(dirpath=str(tmp_path / "hf"), save_on_train_end=False)
    t, module = fit_lora(LLAMA, callbacks=[callback], r=4, lora_alpha=8)
    built = []
    real = model_build.build_meta_model_for

    def counting(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_build, "build_meta_model_for", counting)
    callback.save(t, module, tmp_path / "hf" / "a")
    callback.save(t, module, tmp_path / "hf" / "b")
    assert len(built) == 1
    assert (tmp_path / "hf" / "b" / "model.safetensors").is_file()
