import pytest
import torch

import tiny_models as tm
from lightning_automodel.core.dead_params import (
    find_dead_parameters,
    find_parameters_without_grad,
    freeze_dead_parameters,
    freeze_unused_kv_sharing_params,
)


def no_grad_after_step(model):
    ids = torch.randint(0, tm.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    return set(find_parameters_without_grad(model))


def test_kv_sharing_rule_equals_the_parameters_without_gradient():
    model = tm.synthetic_kv_shared(num_hidden_layers=5, num_kv_shared_layers=2)
    dead = find_dead_parameters(model)
    assert set(dead.values()) == {"kv_sharing"}
    assert set(dead) == no_grad_after_step(tm.synthetic_kv_shared(num_hidden_layers=5, num_kv_shared_layers=2))
    assert all(".layers.3." in n or ".layers.4." in n for n in dead)


def test_kv_sharing_never_touches_a_vision_encoder():
    model = tm.synthetic_kv_shared(with_vision=True)
    dead = freeze_dead_parameters(model)
    assert dead and not any("vision_tower" in n for n in dead)
    assert all(p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)


def test_reference_freezes_the_vision_encoder_too():
    ref = pytest.importorskip("nemo_automodel.components.utils.model_utils")
    model = tm.synthetic_kv_shared(with_vision=True)
    ref.freeze_unused_kv_sharing_params(model)
    assert any(not p.requires_grad for n, p in model.named_parameters() if "vision_tower" in n)


def test_kv_sharing_matches_reference_on_text_only_model():
    ref = pytest.importorskip("nemo_automodel.components.utils.model_utils")
    ours, theirs = tm.synthetic_kv_shared(), tm.synthetic_kv_shared()
    assert freeze_unused_kv_sharing_params(ours) == 12
    ref.freeze_unused_kv_sharing_params(theirs)
    assert {n for n, p in ours.named_parameters() if not p.requires_grad} == {
        n for n, p in theirs.named_parameters() if not p.requires_grad
    }


def test_real_gemma_models_have_no_dead_kv_parameters_in_transformers_5():
    for model in (tm.tiny_gemma3n(), tm.tiny_gemma4()):
        assert find_dead_parameters(model) == {}


@pytest.mark.parametrize(
    ("builder", "ref_name", "rule"),
    [
        (tm.tiny_deepseek_v4, "freeze_deepseek_v4_indexer_params", "deepseek_v4_indexer"),
        (tm.tiny_minimax_m3, "freeze_minimax_m3_indexer_params", "minimax_m3_indexer"),
    ],
)
def test_indexer_rules_match_reference_and_lack_gradients(builder, ref_name, rule):
    ref = pytest.importorskip("nemo_automodel.components.utils.model_utils")
    ours, theirs = builder(), builder()
    dead = freeze_dead_parameters(ours)
    getattr(ref, ref_name)(theirs)
    assert dead and set(dead.values()) == {rule}
    assert set(dead) == {n for n, p in theirs.named_parameters() if not p.requires_grad}
    assert set(dead) <= no_grad_after_step(builder())


def test_rules_do_not_apply_to_other_models():
    assert find_dead_parameters(tm.tiny_llama()) == {}
    assert find_dead_parameters(torch.nn.Linear(2, 2)) == {}
