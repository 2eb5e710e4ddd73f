"""A resume with another LoRA configuration stops with one line naming each field that differs."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import tiny_models as tm
from callbacks.lit_models import loader
from lightning_automodel import HFCausalLM
from lightning_automodel.callbacks import LoRA

pytest.importorskip("peft")


def trainer(tmp_path, steps, lora):
    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      default_root_dir=str(tmp_path), callbacks=[lora])


def module():
    return HFCausalLM(config=dict(tm.tiny_config("llama").to_dict()), learning_rate=1e-2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_resume")
    t = trainer(tmp, 2, LoRA(r=4, lora_alpha=8))
    t.fit(module(), loader(n=16))
    path = tmp / "lora.ckpt"
    t.save_checkpoint(path)
    return path


@pytest.mark.parametrize("lora, expected", [
    (dict(r=8, lora_alpha=8), ["r: 4 (checkpoint) vs 8 (this run)"]),
    (dict(r=4, lora_alpha=32), ["lora_alpha: 8 (checkpoint) vs 32 (this run)"]),
    (dict(r=2, lora_alpha=4), ["lora_alpha: 8 (checkpoint) vs 4 (this run)", "r: 4 (checkpoint) vs 2 (this run)"]),
], ids=["r", "alpha", "both"])
def test_changed_lora_config_is_one_line_naming_the_fields(checkpoint, tmp_path, lora, expected):
    t = trainer(tmp_path, 3, LoRA(**lora))
    with pytest.raises(MisconfigurationException) as info:
        t.fit(module(), loader(n=16), ckpt_path=str(checkpoint))
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert "; ".join(expected) in message, message
    assert "size mismatch" not in message


def test_same_lora_config_resumes(checkpoint, tmp_path):
    t = trainer(tmp_path, 3, LoRA(r=4, lora_alpha=8))
    t.fit(module(), loader(n=16), ckpt_path=str(checkpoint))
    assert t.global_step == 3


@pytest.mark.multiprocess
def test_two_rank_fsdp2_resume_with_another_r_is_one_line(tmp_path):
    from distributed import run_torchrun

    run_torchrun("job_lora_init_fsdp2.py", str(tmp_path), "resume-r", timeout=600)
