"""Resume when the checkpoint has no optimizer state for some trained parameters (2 FSDP2 ranks, DCP).

A LLaVA fine-tuned on text only: its vision tower and projector never get a gradient, so the
checkpoint has no optimizer state for them. See tests/scripts/job_missing_optim_state.py.
"""

from __future__ import annotations

import pytest

from distributed import run_torchrun




@pytest.mark.multiprocess
def test_default_resumes_with_fresh_state_one_warning_and_equals_the_uninterrupted_run(tmp_path):
    run_torchrun("job_missing_optim_state.py", str(tmp_path), "warn", timeout=600)


@pytest.mark.multiprocess
def test_error_choice_stops_with_one_line_naming_them(tmp_path):
    run_torchrun("job_missing_optim_state.py", str(tmp_path), "error", timeout=600)


@pytest.mark.multiprocess
def test_freeze_dead_parameters_advice_followed_verbatim_resumes_and_quotes_the_real_key(tmp_path):
    run_torchrun("job_missing_optim_state.py", str(tmp_path), "advice", timeout=600)


def test_one_device_text_only_llava_resumes_and_the_advice_keeps_the_tower_frozen(tmp_path):
    """One device: the plain resume works (torch starts absent state fresh); following FreezeDeadParameters'
    advice keeps the never-stepped tower frozen instead of ParameterFreezing's restore unfreezing it."""
    import lightning.pytorch as pl

    import tiny_models as tm
    from callbacks.lit_models import loader
    from lightning_automodel import HFCausalLM
    from lightning_automodel.callbacks import ParameterFreezing

    tm.tiny_llava(seed=3).save_pretrained(tmp_path / "base")

    def fit(steps, freezing, ckpt_path=None):
        t = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[freezing])
        module = HFCausalLM(pretrained_path=str(tmp_path / "base"), learning_rate=1e-2)
        t.fit(module, loader(n=8, batch_size=2), ckpt_path=ckpt_path)
        return t, module

    t, _ = fit(2, ParameterFreezing(freeze_vision_tower=False))
    t.save_checkpoint(tmp_path / "a.ckpt")
    t, _ = fit(3, ParameterFreezing(freeze_vision_tower=False), tmp_path / "a.ckpt")
    assert t.global_step == 3
    advice = ParameterFreezing(freeze_vision_tower=False, freeze_modules=[{"path": "model.vision_tower"}], on_resume_mismatch="error")
    t, module = fit(3, advice, tmp_path / "a.ckpt")
    assert t.global_step == 3
    tower = [p for n, p in module.model.named_parameters() if n.startswith("model.vision_tower.")]
    assert tower and not any(p.requires_grad for p in tower)
    assert any(p.requires_grad for n, p in module.model.named_parameters() if "language_model" in n)
