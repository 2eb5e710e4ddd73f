"""Output that is quiet and true: no warning that does not apply, summaries that say what they measure."""

from __future__ import annotations

import warnings

import tiny_models as tm
from callbacks.lit_models import InitLM, loader, trainer

from lightning_automodel.callbacks import CastMixedDtypeToBF16, ParameterSummary
from lightning_automodel.callbacks.parameter_summary import memory_scope


def test_resume_with_changed_callback_arguments_gives_no_missing_callback_warning(tmp_path):
    """Lightning warns "callbacks used to create the checkpoint need to be provided" when a state_key changed."""
    first = trainer(callbacks=[CastMixedDtypeToBF16(), ParameterSummary(name="a")], max_steps=1, default_root_dir=tmp_path)
    first.fit(InitLM(tm.tiny_llama), loader())
    ckpt = tmp_path / "first.ckpt"
    first.save_checkpoint(ckpt)
    second = trainer(callbacks=[CastMixedDtypeToBF16(cast_buffers=True), ParameterSummary(name="b", depth=3)], max_steps=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        second.fit(InitLM(tm.tiny_llama), loader(), ckpt_path=ckpt)
    assert not [w for w in record if "callbacks used to create the checkpoint" in str(w.message)], [str(w.message) for w in record]


def test_memory_line_says_what_it_measures():
    assert memory_scope("replica", 1) == "Per device (one process)"
    assert "each of 2 ranks holds a full replica" in memory_scope("replica", 2)
    assert "sharded over 8 ranks" in memory_scope("sharded", 8)
    model = tm.tiny_llama()
    text = ParameterSummary().summarize(None, model, model, 1, memory_scope("replica", 2))
    assert "DDP: each of 2 ranks holds a full replica" in text and "world size 1" not in text


def test_a_flag_that_reaches_nothing_and_a_tied_freeze_are_each_one_line():
    import pytest

    from lightning_automodel.callbacks import ParameterFreezing

    with pytest.warns(UserWarning, match="freeze_language_model matched no parameters") as record:
        trainer(callbacks=[ParameterFreezing(freeze_language_model=True)], max_steps=1).fit(InitLM(tm.tiny_llama), loader())
    assert len([w for w in record if "freeze_language_model" in str(w.message)]) == 1

    tied = lambda: tm.tiny_llama(tie_word_embeddings=True)  # noqa: E731
    with pytest.warns(UserWarning, match=r"model\.embed_tokens\.weight frozen; lm_head\.weight is the same tensor \(tied\)"):
        trainer(callbacks=[ParameterFreezing(freeze_modules=[{"path": "model.embed_tokens"}])], max_steps=1).fit(InitLM(tied), loader())


def test_the_implicit_vision_freeze_on_a_text_model_is_silent():
    from lightning_automodel.core.freezing import plan_parameter_freezing

    assert plan_parameter_freezing(tm.tiny_llama(), {}).notes == []
