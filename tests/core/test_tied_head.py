import pytest
import torch
from torch import nn

import tiny_models as tm
from core.pg import single_rank_group
from lightning_automodel.core.tied_head import (
    TieSupport,
    diagnose_tie,
    ensure_tied_lm_head,
    get_lm_head_weight,
    get_lm_head_weight_and_name,
    get_tied_lm_head_source_names,
    has_local_tied_lm_head,
    is_tied_word_embeddings,
    fill_missing_tied_lm_head,
)

ref = None
try:
    from nemo_automodel.components.checkpoint import utils as ref
except ImportError:  # pragma: no cover
    pass


def break_tie(model):
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone() + 1.0)
    return model


def test_tied_and_untied_models():
    assert has_local_tied_lm_head(tm.tiny_gemma3())
    assert has_local_tied_lm_head(tm.tiny_llama(tie_word_embeddings=True))
    assert not has_local_tied_lm_head(tm.tiny_llama())
    assert diagnose_tie(tm.tiny_llama()).config_tied is False


def test_broken_tie_is_repaired_and_reported():
    model = break_tie(tm.tiny_gemma3())
    status = diagnose_tie(model)
    assert status.config_tied and not status.locally_tied and "separate tensors" in status.reason
    assert ensure_tied_lm_head(model) is True
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_meta_init_then_to_empty_breaks_and_ensure_repairs():
    with torch.device("meta"):
        model = tm.build(tm.tiny_config("gemma3_text"))
    model.lm_head.weight = nn.Parameter(torch.empty_like(model.lm_head.weight))  # as a naive materialization does
    model.to_empty(device="cpu")
    assert not has_local_tied_lm_head(model)
    assert ensure_tied_lm_head(model)
    assert has_local_tied_lm_head(model)


def test_shape_mismatch_gets_a_clear_reason_and_no_tie():
    model = tm.tiny_gemma3()
    model.lm_head = nn.Linear(64, tm.VOCAB - 8, bias=False)
    status = diagnose_tie(model)
    assert "differ in shape" in status.reason and "[248, 64]" in status.reason
    assert ensure_tied_lm_head(model) is False


def test_class_attribute_is_authoritative():
    model = tm.tiny_llama()

    class Forced(type(model)):
        tie_word_embeddings_support = TieSupport.TIED_ONLY

    model.__class__ = Forced
    assert is_tied_word_embeddings(model)


def test_fill_missing_head_aliases_embedding():
    model = tm.tiny_gemma3()
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert fill_missing_tied_lm_head(sd, model) is True
    assert sd["lm_head.weight"] is not None
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    assert fill_missing_tied_lm_head(sd, model) is False  # already present


def test_fill_without_source_and_fallback():
    model = tm.tiny_gemma3()
    assert fill_missing_tied_lm_head({}, model) is False
    sd = {}
    assert fill_missing_tied_lm_head(sd, model, allow_current_lm_head_fallback=True)
    assert torch.equal(sd["lm_head.weight"], model.lm_head.weight)
    assert fill_missing_tied_lm_head({}, tm.tiny_llama()) is False  # untied


@pytest.mark.skipif(ref is None, reason="reference not installed")
@pytest.mark.parametrize("builder", [tm.tiny_gemma3, tm.tiny_llama, lambda: break_tie(tm.tiny_gemma3())])
def test_matches_reference(builder):
    a, b = builder(), builder()
    assert has_local_tied_lm_head(a) == ref.has_local_tied_lm_head(b)
    assert get_tied_lm_head_source_names(a) == ref.get_tied_lm_head_source_names(b)
    sd_a = {k: v for k, v in a.state_dict().items() if k != "lm_head.weight"}
    sd_b = dict(sd_a)
    assert fill_missing_tied_lm_head(sd_a, a) == ref.materialize_missing_tied_lm_head(sd_b, b)
    assert sd_a.keys() == sd_b.keys()
    assert ensure_tied_lm_head(a) == ref.ensure_tied_lm_head(b)


def test_normalize_param_name_is_the_canonical_rule():
    from lightning_automodel.checkpoint_utils import _normalize_param_name

    assert _normalize_param_name("a._checkpoint_wrapped_module.b._orig_mod.c") == "a.b.c"
    assert _normalize_param_name("module.x") == "module.x"
    # FSDP1's wrapper component goes too (the tied-head rule used to keep it)
    assert _normalize_param_name("_fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module.mlp.weight") == "model.layers.0.mlp.weight"


def test_tied_head_names_drop_the_fsdp1_wrapper():
    model = nn.Module()
    model.add_module("_fsdp_wrapped_module", nn.Module())
    model._fsdp_wrapped_module.lm_head = nn.Linear(2, 3, bias=False)
    _, name = get_lm_head_weight_and_name(model)
    assert name == "lm_head.weight"


def test_tie_survives_fully_shard_in_one_group_and_full_weight():
    from torch.distributed.fsdp import fully_shard

    with single_rank_group():
        model = tm.tiny_gemma3()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard([model.model.embed_tokens, model.lm_head])
        fully_shard(model)
        assert has_local_tied_lm_head(model)
        full = get_lm_head_weight(model)
        assert not hasattr(full, "to_local") and full.shape == (tm.VOCAB, 64)
