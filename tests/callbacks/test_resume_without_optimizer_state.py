"""One device: a resume that leaves trainable parameters without optimizer state says so (issue 17, item 4)."""

from __future__ import annotations

import warnings

import tiny_models as tm
from callbacks.lit_models import InitLM, loader, trainer

from lightning_automodel.callbacks import TiedLMHead


def test_a_text_trained_vlm_resumes_with_one_warning_naming_the_vision_tower(tmp_path):
    first = trainer(callbacks=[TiedLMHead()], max_steps=2, default_root_dir=tmp_path)
    first.fit(InitLM(tm.tiny_llava), loader())  # text only: the vision tower never gets a gradient
    ckpt = tmp_path / "text.ckpt"
    first.save_checkpoint(ckpt)
    resumed = InitLM(tm.tiny_llava)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(callbacks=[TiedLMHead()], max_steps=3).fit(resumed, loader(), ckpt_path=ckpt)
    notes = [str(w.message) for w in record if "have no optimizer state" in str(w.message)]
    assert len(notes) == 1, notes
    assert "model.model.vision_tower." in notes[0] and "lm_head" not in notes[0]


def test_a_resume_with_every_state_present_is_silent(tmp_path):
    first = trainer(callbacks=[TiedLMHead()], max_steps=2, default_root_dir=tmp_path)
    first.fit(InitLM(tm.tiny_llama), loader())
    ckpt = tmp_path / "llama.ckpt"
    first.save_checkpoint(ckpt)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer(callbacks=[TiedLMHead()], max_steps=3).fit(InitLM(tm.tiny_llama), loader(), ckpt_path=ckpt)
    assert not [w for w in record if "have no optimizer state" in str(w.message)]
