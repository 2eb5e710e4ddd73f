import pytest
import torch

import tiny_models as tm
from lightning_automodel.core.dead_params import DEAD_PARAMETER_RULES, find_dead_parameters, freeze_dead_parameters
from lightning_automodel.core.naming import unique_named_parameters
from lightning_automodel.model_utils import freeze_unused_kv_sharing_params


def no_grad_after_step(model):
    ids = torch.randint(0, tm.VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    return {name for name, p in unique_named_parameters(model) if p.requires_grad and p.grad is None}


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


def test_kv_sharing_matches_reference_on_text_only_model():
    ref = pytest.importorskip("nemo_automodel.components.utils.model_utils")
    ours, theirs = tm.synthetic_kv_shared(), tm.synthetic_kv_shared()
    freeze_unused_kv_sharing_params(ours)
    assert sum(not p.requires_grad for p in ours.parameters()) == 12
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


# ---- rules by name ----------------------------------------------------------------------------------

from types import SimpleNamespace  # noqa: E402

from torch import nn  # noqa: E402


def test_kv_sharing_rule_matches_whole_names_of_shared_layers_only():
    assert list(DEAD_PARAMETER_RULES) == ["kv_sharing", "deepseek_v4_indexer", "minimax_m3_indexer"]
    model = tm.synthetic_kv_shared()
    model.model.layers[3].self_attn.k_proj_extra = nn.Linear(2, 2)  # a longer name than k_proj: alive
    dead = find_dead_parameters(model, ("kv_sharing",))
    assert "model.layers.3.self_attn.k_proj.weight" in dead
    assert not any(".layers.1." in n or "q_proj" in n or "k_proj_extra" in n for n in dead)
    assert find_dead_parameters(model, ("deepseek_v4_indexer", "minimax_m3_indexer")) == {}


def test_one_pass_over_the_parameters(monkeypatch):
    model = tm.synthetic_kv_shared()
    calls = []
    original = model.named_parameters
    monkeypatch.setattr(model, "named_parameters", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert find_dead_parameters(model)
    assert len(calls) == 1


# ---- a multimodal layout without get_decoder(), vision tower registered first -----------------------


class _VLM(nn.Module):
    def __init__(self, layers=4, shared=2, hidden=8):
        super().__init__()
        self.config = SimpleNamespace(
            model_type="gemma_like_vlm",
            text_config=SimpleNamespace(num_hidden_layers=layers, num_kv_shared_layers=shared),
        )
        self.model = nn.Module()
        self.model.vision_tower = nn.Module()
        self.model.vision_tower.encoder = nn.Module()
        self.model.vision_tower.encoder.layers = nn.ModuleList(tm._Layer(hidden) for _ in range(layers))
        self.model.language_model = nn.Module()
        self.model.language_model.layers = nn.ModuleList(tm._Layer(hidden) for _ in range(layers))


def _expected_kv(model, prefix, layers, first_shared):
    names = set()
    for i in range(first_shared, len(layers)):
        for proj in ("k_proj", "v_proj", "k_norm", "v_norm"):
            for pname, _ in getattr(layers[i].self_attn, proj).named_parameters():
                names.add(f"{prefix}.{i}.self_attn.{proj}.{pname}")
    return names


def test_text_config_and_fallback_decoder_search_skip_the_vision_tower():
    model = _VLM()
    expected = _expected_kv(model, "model.language_model.layers", model.model.language_model.layers, 2)
    dead = freeze_dead_parameters(model)
    assert set(dead) == expected and set(dead.values()) == {"kv_sharing"}
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == expected


def test_layer_count_mismatch_freezes_nothing():
    model = _VLM()
    model.config.text_config.num_hidden_layers = 6  # config disagrees with the model: do not guess
    assert find_dead_parameters(model) == {}


def test_checkpoint_wrapped_layers_use_canonical_names():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    plain = find_dead_parameters(tm.synthetic_kv_shared())
    model = tm.synthetic_kv_shared()
    for i, layer in enumerate(model.model.layers):
        model.model.layers[i] = checkpoint_wrapper(layer)
    assert freeze_dead_parameters(model) == plain
    wrapped_frozen = {n.replace("._checkpoint_wrapped_module", "") for n, p in model.named_parameters() if not p.requires_grad}
    assert wrapped_frozen == set(plain)


def test_after_freezing_every_trainable_parameter_gets_a_gradient():
    for builder in (tm.synthetic_kv_shared, tm.tiny_minimax_m3):
        model = builder()
        freeze_dead_parameters(model)
        assert no_grad_after_step(model) == set(), builder.__name__


def test_indexer_rule_reads_the_text_config_model_type_of_a_wrapper():
    holder = nn.Module()
    holder.config = SimpleNamespace(model_type="deepseek_v4_vl", text_config=SimpleNamespace(model_type="deepseek_v4"))
    holder.model = nn.Module()
    layer = nn.Module()
    layer.self_attn = nn.Module()
    layer.self_attn.compressor = nn.Module()
    layer.self_attn.compressor.indexer = nn.Linear(2, 2)
    layer.self_attn.q_proj = nn.Linear(2, 2)
    holder.model.layers = nn.ModuleList([layer])
    dead = find_dead_parameters(holder)
    assert dead == {
        "model.layers.0.self_attn.compressor.indexer.weight": "deepseek_v4_indexer",
        "model.layers.0.self_attn.compressor.indexer.bias": "deepseek_v4_indexer",
    }
