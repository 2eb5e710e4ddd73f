import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import tiny_models as tm
from lightning_automodel.core.freezing import (
    FREEZE_CONFIG_KEYS,
    FreezeConfig,
    ModuleSelector,
    apply_parameter_freezing,
    matches_component_prefix,
    parse_freeze_config,
)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def frozen(model):
    return {n for n, p in model.named_parameters() if not p.requires_grad}


# ---- parser ---------------------------------------------------------------------------------


def test_parse_defaults_and_selectors():
    cfg = parse_freeze_config({"freeze_modules": [{"glob": "model.*"}], "unfreeze_modules": [{"path": "lm_head"}]})
    assert cfg.freeze_modules == (ModuleSelector(glob="model.*"),)
    assert cfg.unfreeze_modules == (ModuleSelector(path="lm_head"),)
    assert cfg.effective_flags()["freeze_vision_tower"] is False  # selectors declared: no implicit vision freeze
    assert parse_freeze_config({}).effective_flags()["freeze_vision_tower"] is True
    assert parse_freeze_config(None) == FreezeConfig()


@pytest.mark.parametrize("bad", [{"freeze_embeddings": True}, {"freeze_vision": True}])
def test_unknown_keys_list_valid_ones(bad):
    with pytest.raises(ValueError) as err:
        parse_freeze_config(bad)
    for key in FREEZE_CONFIG_KEYS:
        assert key in str(err.value)


@pytest.mark.parametrize(
    "bad",
    [
        {"freeze_audio_tower": "yes"},
        {"freeze_modules": "model.vision_tower"},
        {"freeze_modules": [{"path": "a", "glob": "b"}]},
        {"freeze_modules": [{"regex": "a"}]},
        {"freeze_modules": ["model.vision_tower"]},
        {"unfreeze_modules": [{"path": ""}]},
    ],
)
def test_malformed_config_is_a_value_error(bad):
    with pytest.raises(ValueError):
        parse_freeze_config(bad)


def test_non_mapping_is_a_type_error():
    with pytest.raises(TypeError):
        parse_freeze_config(["freeze_vision_tower"])


_flags = st.sampled_from(["freeze_vision_tower", "freeze_audio_tower", "freeze_language_model", "freeze_video_embedder"])
_selector = st.one_of(
    st.fixed_dictionaries({"path": st.text(min_size=1, max_size=12)}),
    st.fixed_dictionaries({"glob": st.text(min_size=1, max_size=12)}),
)


@settings(max_examples=150, deadline=None)
@given(
    flags=st.dictionaries(_flags, st.booleans()),
    freeze=st.one_of(st.none(), st.lists(_selector, max_size=3)),
    unfreeze=st.one_of(st.none(), st.lists(_selector, max_size=3)),
)
def test_parser_round_trip_property(flags, freeze, unfreeze):
    raw = dict(flags)
    if freeze is not None:
        raw["freeze_modules"] = freeze
    if unfreeze is not None:
        raw["unfreeze_modules"] = unfreeze
    cfg = parse_freeze_config(raw)
    for key, value in flags.items():
        assert getattr(cfg, key) is value
    declared = freeze is not None or unfreeze is not None
    expected_vision = flags.get("freeze_vision_tower", not declared)
    assert cfg.effective_flags()["freeze_vision_tower"] is expected_vision
    assert [s.describe() for s in cfg.freeze_modules or ()] == [
        f"{k}: {v}" for entry in (freeze or []) for k, v in entry.items()
    ]


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=10), st.booleans(), min_size=1))
def test_parser_rejects_any_unknown_key(raw):
    if set(raw) <= set(FREEZE_CONFIG_KEYS):
        return
    with pytest.raises(ValueError, match="valid options are"):
        parse_freeze_config(raw)


# ---- legacy flags -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "pattern", "expected"),
    [
        ("model.vision_tower.encoder", "vision", True),
        ("model.visual_extra", "visual", True),
        ("model.context_proj", "text", False),
        ("model.text_model", "text", True),
        ("model.Vision_Tower", "vision", True),
        ("model.patch_generator.video_embedder", "patch_generator.video_embedder", True),
        ("model.patch_generator.video_embedder_2", "patch_generator.video_embedder", True),
        ("model.other.video_embedder", "patch_generator.video_embedder", False),
        ("model.supervision_head", "vision", False),
    ],
)
def test_component_prefix_matching(path, pattern, expected):
    assert matches_component_prefix(path, pattern) is expected


class _ContextModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.context_proj = nn.Linear(4, 4)
        self.text_model = nn.Linear(4, 4)
        self.language_model = None  # exists but is None: must not crash
        self.vision_tower = None


def test_legacy_language_flag_matches_components_not_substrings():
    model = _ContextModel()
    report = apply_parameter_freezing(model, {"freeze_language_model": True, "freeze_vision_tower": False})
    assert frozen(model) == {"text_model.weight", "text_model.bias"}
    assert set(report.frozen.values()) == {"freeze_language_model"}


def test_vlm_default_freezes_vision_tower_only():
    model = tm.tiny_llava()
    report = apply_parameter_freezing(model, {})
    vision = {n for n, _ in model.named_parameters() if n.startswith("model.vision_tower.")}
    assert frozen(model) == vision
    assert set(report.frozen) == vision
    assert all(rule == "freeze_vision_tower" for rule in report.frozen.values())


def test_vlm_matches_reference_on_towers():
    ref = pytest.importorskip("nemo_automodel.components.utils.model_utils")
    for cfg in ({}, {"freeze_language_model": True}, {"freeze_modules": [{"glob": "model.language_model.layers.*"}]}):
        ours, theirs = tm.tiny_llava(), tm.tiny_llava()
        apply_parameter_freezing(ours, cfg)
        ref.apply_parameter_freezing(theirs, cfg)
        assert frozen(ours) == frozen(theirs), cfg


# ---- selectors ---------------------------------------------------------------------------------


def test_unfreeze_wins_and_report_names_rules():
    model = tm.tiny_llama()
    report = apply_parameter_freezing(
        model,
        {"freeze_modules": [{"glob": "model.layers.*"}], "unfreeze_modules": [{"path": "model.layers.1.mlp"}]},
    )
    expected_frozen = {n for n, _ in model.named_parameters() if n.startswith("model.layers.") and ".1.mlp." not in n}
    assert frozen(model) == expected_frozen
    assert set(report.frozen) == expected_frozen
    assert report.unfrozen and all(v.startswith("unfreeze_modules[path: model.layers.1.mlp]") for v in report.unfrozen.values())


def test_selector_may_name_a_parameter_registered_on_a_module():
    model = tm.tiny_llama()
    apply_parameter_freezing(model, {"freeze_modules": [{"path": "model.norm.weight"}]})
    assert frozen(model) == {"model.norm.weight"}


def test_strict_error_leaves_model_untouched():
    model = tm.tiny_llama()
    before = trainable(model)
    with pytest.raises(ValueError, match=r"freeze_modules\[1\] selector `path: model.nope`"):
        apply_parameter_freezing(model, {"freeze_modules": [{"glob": "model.layers.*"}, {"path": "model.nope"}]})
    assert trainable(model) == before  # no partial freeze


def test_non_strict_allows_unmatched():
    model = tm.tiny_llama()
    report = apply_parameter_freezing(model, {"freeze_modules": [{"path": "model.nope"}]}, strict=False)
    assert report.frozen == {} and frozen(model) == set()


def test_tied_weights_reported_once():
    model = tm.tiny_gemma3()
    report = apply_parameter_freezing(model, {"freeze_modules": [{"path": "lm_head"}]})
    assert not model.model.embed_tokens.weight.requires_grad
    assert list(report.frozen) == ["model.embed_tokens.weight"]


def test_checkpoint_wrapper_paths_are_canonical():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = tm.tiny_llama()
    model.model.layers[0] = checkpoint_wrapper(model.model.layers[0])
    report = apply_parameter_freezing(model, {"freeze_modules": [{"path": "model.layers.0.mlp"}]})
    assert set(report.frozen) == {f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    assert all(not p.requires_grad for p in model.model.layers[0]._checkpoint_wrapped_module.mlp.parameters())


# ---- typed config built in Python ----------------------------------------------------------------


def test_freeze_config_built_directly_is_normalized_and_validated():
    cfg = FreezeConfig(freeze_modules=[ModuleSelector(path="lm_head")])
    assert cfg.freeze_modules == (ModuleSelector(path="lm_head"),)
    hash(cfg)  # frozen and hashable even when given a list
    assert parse_freeze_config(cfg) is cfg
    with pytest.raises(TypeError, match="ModuleSelector"):
        FreezeConfig(freeze_modules=[{"path": "lm_head"}])
    with pytest.raises(TypeError, match="freeze_audio_tower"):
        FreezeConfig(freeze_audio_tower="yes")
    with pytest.raises(ValueError, match="freeze_config.freeze_audio_tower must be true or false"):
        FreezeConfig(freeze_audio_tower="yes")  # one validator: the same line as from YAML
    with pytest.raises(TypeError, match="freeze_modules"):
        FreezeConfig(freeze_modules="lm_head")


def test_unmatched_unfreeze_selector_is_named():
    with pytest.raises(ValueError, match=r"unfreeze_modules\[0\] selector `glob: \*nothing\*`"):
        apply_parameter_freezing(tm.tiny_llama(), {"unfreeze_modules": [{"glob": "*nothing*"}]})


# ---- video embedder --------------------------------------------------------------------------------


class _Radio(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision_model = nn.Module()
        self.vision_model.patch_generator = nn.Module()
        self.vision_model.patch_generator.video_embedder = nn.Linear(2, 2)
        self.vision_model.patch_generator.image_embedder = nn.Linear(2, 2)
        self.decoder = nn.Module()
        self.decoder.video_embedder = nn.Linear(2, 2)  # not under a patch generator


def test_video_embedder_flag_matches_reference():
    model = _Radio()
    report = apply_parameter_freezing(model, {"freeze_video_embedder": True, "freeze_vision_tower": False})
    assert frozen(model) == {"vision_model.patch_generator.video_embedder.weight", "vision_model.patch_generator.video_embedder.bias"}
    assert set(report.frozen.values()) == {"freeze_video_embedder"}
    ref = pytest.importorskip("nemo_automodel.components.utils.model_utils")
    theirs = _Radio()
    ref.apply_parameter_freezing(theirs, {"freeze_video_embedder": True, "freeze_vision_tower": False})
    assert frozen(theirs) == frozen(model)


# ---- selectors: differential property against the reference ---------------------------------------

_LLAMA_MODULE_PATHS = [
    "model", "model.embed_tokens", "model.layers", "model.layers.0", "model.layers.1", "model.layers.0.self_attn",
    "model.layers.1.mlp", "model.layers.0.mlp.down_proj", "model.norm", "lm_head", "model.rotary_emb",
]
_GLOBS = ["model.layers.*", "*.mlp", "*proj", "*.self_attn.*", "model.layers.[01].mlp", "*norm*", "lm_*", "*"]
_any_selector = st.one_of(
    st.builds(lambda p: {"path": p}, st.sampled_from(_LLAMA_MODULE_PATHS)),
    st.builds(lambda g: {"glob": g}, st.sampled_from(_GLOBS)),
)


@settings(max_examples=40, deadline=None)
@given(freeze=st.lists(_any_selector, max_size=3), unfreeze=st.lists(_any_selector, max_size=2), pre_frozen=st.booleans())
def test_selectors_agree_with_reference_on_module_paths(freeze, unfreeze, pre_frozen):
    ref = pytest.importorskip("nemo_automodel.components.utils.model_utils")
    ours, theirs = _LLAMA_PAIR
    for model in (ours, theirs):
        for i, p in enumerate(model.parameters()):
            p.requires_grad_(not (pre_frozen and i % 2))
    cfg = {"freeze_modules": freeze, "unfreeze_modules": unfreeze}
    apply_parameter_freezing(ours, cfg, strict=False)
    ref.apply_parameter_freezing(theirs, cfg, strict=False)
    assert frozen(ours) == frozen(theirs)


_LLAMA_PAIR = (tm.tiny_llama(), tm.tiny_llama())


def test_glob_may_select_parameters_bitfit():
    model = tm.tiny_llava()
    cfg = {"freeze_modules": [{"glob": "*"}], "unfreeze_modules": [{"glob": "*.bias"}]}
    report = apply_parameter_freezing(model, cfg)
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert biases and trainable(model) == biases
    assert set(report.unfrozen) == biases
