"""The model_utils façade: the reference's names and parameters, its results where meant to match,
and, for each deliberate difference, a test that shows the reference behaving the other way."""

import inspect
import logging
import math

import pytest
import torch
from torch import nn

import lightning_automodel.model_utils as mu
import tiny_models as tm

REF_PATH = "nemo_automodel.components.utils.model_utils"

NAMES = [
    "_freeze_module_by_attribute_and_patterns", "_get_forward_signature", "_get_logical_numel",
    "_get_model_param_stats", "_supports_logits_to_keep", "_supports_seq_lens", "apply_parameter_freezing",
    "cast_mixed_dtype_params_to_bf16", "count_model_parameters", "enable_radio_vit_fused_attn",
    "filter_forward_kwargs", "freeze_deepseek_v4_indexer_params", "freeze_minimax_m3_indexer_params",
    "freeze_unused_kv_sharing_params", "get_lm_head_module", "get_lm_head_weight", "init_empty_weights",
    "print_trainable_parameters", "resolve_trust_remote_code", "skip_random_init", "squeeze_input_for_thd",
    "VLM_INPUT_KEYS", "logger", "FreezeConfig", "ModuleSelector", "parse_freeze_config",
]


@pytest.fixture(scope="module")
def ref():
    return pytest.importorskip(REF_PATH)


def frozen(model):
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def test_all_names_exported():
    assert [n for n in NAMES if not hasattr(mu, n)] == []
    assert set(NAMES) <= set(mu.__all__)
    assert mu.logger.name == "lightning_automodel.model_utils"


def test_parameter_names_and_defaults_match_the_reference(ref):
    for name in NAMES:
        theirs = getattr(ref, name, None)
        if not inspect.isfunction(inspect.unwrap(theirs)) if theirs is not None else True:
            continue
        a = inspect.signature(inspect.unwrap(getattr(mu, name))).parameters
        b = inspect.signature(inspect.unwrap(theirs)).parameters
        assert list(a)[: len(b)] == list(b), name
        for key in b:
            assert (a[key].kind, a[key].default) == (b[key].kind, b[key].default), (name, key)
        # extra parameters (e.g. include_buffers) are optional, so reference calls still work
        assert all(a[key].default is not inspect.Parameter.empty for key in list(a)[len(b):]), name


# ---- counts and stats -----------------------------------------------------------------------------


@pytest.mark.parametrize("builder", [tm.tiny_llama, tm.tiny_gemma3, tm.tiny_gemma3n, tm.tiny_llava])
def test_counts_and_squared_norm_match_the_reference(ref, builder):
    model = builder()
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 4 != 1)
    ours, theirs = mu._get_model_param_stats(model), ref._get_model_param_stats(model)
    assert ours[:2] == theirs[:2]
    assert ours[2] == pytest.approx(theirs[2], rel=1e-5)  # squared norm, as the reference returns
    assert tuple(mu.count_model_parameters(model)) == tuple(ref.count_model_parameters(model)) == (ours[1], ours[0])


def test_logical_numel_of_a_quantized_params4bit(ref):
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.randn(32, 64, dtype=torch.bfloat16)
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")._quantize("cpu")
    assert p.numel() == 32 * 64 // 2 and p.dtype == torch.uint8
    assert mu._get_logical_numel(p) == ref._get_logical_numel(p) == 32 * 64


def _lines(records, logger_name):
    return [r.getMessage() for r in records if r.name == logger_name]


def test_print_trainable_parameters_same_lines_as_the_reference(ref, caplog):
    model = tm.tiny_llama()
    model.lm_head.weight.requires_grad_(False)
    with caplog.at_level(logging.INFO):
        theirs = ref.print_trainable_parameters(model, name="Draft")
        ref_lines = _lines(caplog.records, "root")
        caplog.clear()
        ours = mu.print_trainable_parameters(model, name="Draft")
        our_lines = _lines(caplog.records, mu.logger.name)
    assert ours == theirs
    assert len(our_lines) == len(ref_lines) == 7
    assert our_lines[:-2] + our_lines[-1:] == ref_lines[:-2] + ref_lines[-1:]
    ours_norm, ref_norm = (float(lines[5].rsplit(" ", 1)[1]) for lines in (our_lines, ref_lines))
    assert ours_norm == pytest.approx(ref_norm, abs=1e-3)
    assert not _lines(caplog.records, "root")  # nothing through the root logger


def test_print_trainable_parameters_only_on_rank_0(caplog, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    model = tm.tiny_llama()
    with caplog.at_level(logging.INFO):
        assert mu.print_trainable_parameters(model) == tuple(mu.count_model_parameters(model))
    assert not _lines(caplog.records, mu.logger.name)


def test_print_trainable_parameters_on_meta_does_not_crash(caplog):
    with torch.device("meta"):
        model = tm.build(tm.tiny_config("llama"))
    with caplog.at_level(logging.INFO):
        trainable, total = mu.print_trainable_parameters(model)
    lines = _lines(caplog.records, mu.logger.name)
    assert trainable == total > 0 and lines[5] == "Param L2 norm: nan"


# ---- freezing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"freeze_vision_tower": False, "freeze_language_model": True},
        {"freeze_modules": [{"glob": "model.language_model.layers.*"}], "unfreeze_modules": [{"path": "model.language_model.layers.1.mlp"}]},
        {"freeze_vision_tower": True, "freeze_modules": [{"path": "lm_head"}]},
        {"unfreeze_modules": [{"glob": "*"}]},
    ],
)
def test_freezing_matches_the_reference_on_a_vlm(ref, cfg):
    ours, theirs = tm.tiny_llava(), tm.tiny_llava()
    mu.apply_parameter_freezing(ours, cfg)
    ref.apply_parameter_freezing(theirs, cfg)
    assert frozen(ours) == frozen(theirs)


def test_none_config_is_a_no_op_like_the_reference(ref):
    ours, theirs = tm.tiny_llava(), tm.tiny_llava()
    assert mu.parse_freeze_config(None) is None and ref.parse_freeze_config(None) is None
    report = mu.apply_parameter_freezing(ours, None)
    ref.apply_parameter_freezing(theirs, None)
    assert frozen(ours) == frozen(theirs) == set() and report.frozen == {}


def test_freeze_embeddings_is_rejected_like_the_reference(ref):
    with pytest.raises(ValueError) as ours:
        mu.apply_parameter_freezing(tm.tiny_llama(), {"freeze_embeddings": True})
    with pytest.raises(ValueError) as theirs:
        ref.apply_parameter_freezing(tm.tiny_llama(), {"freeze_embeddings": True})
    assert str(ours.value) == str(theirs.value)


def test_strict_failure_leaves_the_model_untouched_where_the_reference_half_freezes(ref):
    cfg = {"freeze_language_model": True, "freeze_modules": [{"glob": "model.*"}, {"path": "model.missing"}]}
    ours, theirs = tm.tiny_llava(), tm.tiny_llava()
    with pytest.raises(ValueError, match="missing"):
        mu.apply_parameter_freezing(ours, cfg)
    with pytest.raises(ValueError, match="missing"):
        ref.apply_parameter_freezing(theirs, cfg)
    assert frozen(ours) == set()
    assert frozen(theirs)  # the reference applied the first rules before failing


class _Towers(nn.Module):
    def __init__(self):
        super().__init__()
        self.context_proj = nn.Linear(2, 2)  # contains "text" as a substring
        self.text_encoder = nn.Linear(2, 2)
        self.language_head = nn.Linear(2, 2)  # component starts with "language": frozen by design
        self.language_model = None  # attribute present but None


def test_legacy_patterns_match_component_prefixes_not_substrings(ref):
    ours, theirs = _Towers(), _Towers()
    mu._freeze_module_by_attribute_and_patterns(ours, "language_model", ["language", "text", "llm"])
    ref._freeze_module_by_attribute_and_patterns(theirs, "language_model", ["language", "text", "llm"])
    expected = {f"{m}.{p}" for m in ("text_encoder", "language_head") for p in ("weight", "bias")}
    assert frozen(ours) == expected
    assert frozen(theirs) == expected | {"context_proj.weight", "context_proj.bias"}


def test_phi4mm_side_effect_matches_the_reference(ref):
    ours, theirs = tm.tiny_llama(), tm.tiny_llama()
    for m in (ours, theirs):
        m.config.model_type = "phi4mm"
        m.config.use_cache = True
        m.model.layers[0].mlp.to(torch.float16)  # non-fp32 stays as it is
    mu.apply_parameter_freezing(ours, {"freeze_vision_tower": False})
    ref.apply_parameter_freezing(theirs, {"freeze_vision_tower": False})
    assert ours.config.use_cache is theirs.config.use_cache is False
    assert {k: v.dtype for k, v in ours.state_dict().items()} == {k: v.dtype for k, v in theirs.state_dict().items()}
    assert ours.model.rotary_emb.inv_freq.dtype == torch.bfloat16


def test_no_phi4mm_side_effect_for_other_models():
    model = tm.tiny_llama()
    model.config.use_cache = True
    mu.apply_parameter_freezing(model, {"freeze_vision_tower": False})
    assert model.config.use_cache is True and model.lm_head.weight.dtype == torch.float32


# ---- dead parameters and casting ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("builder", "name"),
    [
        (tm.synthetic_kv_shared, "freeze_unused_kv_sharing_params"),
        (tm.tiny_deepseek_v4, "freeze_deepseek_v4_indexer_params"),
        (tm.tiny_minimax_m3, "freeze_minimax_m3_indexer_params"),
    ],
)
def test_dead_parameter_freezes_match_the_reference(ref, builder, name):
    ours, theirs = builder(), builder()
    assert getattr(mu, name)(ours) is None
    getattr(ref, name)(theirs)
    assert frozen(ours) == frozen(theirs) != set()


def test_kv_sharing_leaves_a_vision_encoder_alone_unlike_the_reference(ref):
    ours, theirs = tm.synthetic_kv_shared(with_vision=True), tm.synthetic_kv_shared(with_vision=True)
    mu.freeze_unused_kv_sharing_params(ours)
    ref.freeze_unused_kv_sharing_params(theirs)
    assert not any("vision_tower" in n for n in frozen(ours))
    assert any("vision_tower" in n for n in frozen(theirs))
    assert frozen(ours) == {n for n in frozen(theirs) if "vision_tower" not in n}


def test_cast_mixed_dtype_params_to_bf16_matches_the_reference(ref):
    ours, theirs = tm.tiny_gemma3(), tm.tiny_gemma3()
    ours.model.layers[0].mlp.to(torch.float16)
    theirs.model.layers[0].mlp.to(torch.float16)
    params = dict(ours.named_parameters())
    assert mu.cast_mixed_dtype_params_to_bf16(ours) is None
    ref.cast_mixed_dtype_params_to_bf16(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert all(p is params[n] for n, p in ours.named_parameters())
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


# ---- names wired from the other core modules --------------------------------------------------


def test_wired_helpers_agree_with_the_reference(ref):
    model = tm.tiny_llama()
    assert mu._supports_logits_to_keep(model) == ref._supports_logits_to_keep(model)
    assert mu._supports_seq_lens(model) == ref._supports_seq_lens(model)
    kwargs = {"input_ids": 1, "bogus": 2}
    assert mu.filter_forward_kwargs(model, kwargs) == ref.filter_forward_kwargs(model, kwargs)
    assert tuple(mu.VLM_INPUT_KEYS) == tuple(ref.VLM_INPUT_KEYS)
    assert mu.get_lm_head_module(model) is ref.get_lm_head_module(model) is model.lm_head
    assert torch.equal(mu.get_lm_head_weight(model), ref.get_lm_head_weight(model))
    for path in ("nvidia/x", "meta/x", None):
        assert mu.resolve_trust_remote_code(path) == ref.resolve_trust_remote_code(path)


def test_thd_squeeze_matches_the_reference(ref):
    def inputs():
        return (
            torch.arange(6).view(1, 6), torch.arange(6).view(1, 6), torch.ones(1, 6, dtype=torch.bool),
            {"cu_seqlens": torch.tensor([[0, 3, 6, -1000]], dtype=torch.int32), "max_seqlen": torch.tensor([3])},
        )

    ours, theirs = mu.squeeze_input_for_thd(*inputs()), ref.squeeze_input_for_thd(*inputs())
    for a, b in zip(ours[:3], theirs[:3]):
        assert torch.equal(a, b)
    assert torch.equal(ours[3]["cu_seqlens"], theirs[3]["cu_seqlens"])
    assert ours[3]["max_seqlen"] == theirs[3]["max_seqlen"] == 3


def test_norm_is_global_on_a_one_rank_sharded_model():
    from torch.distributed.fsdp import fully_shard

    from core.pg import single_rank_group

    model = tm.tiny_llama()
    expected = sum(p.detach().double().pow(2).sum().item() for p in model.parameters())
    with single_rank_group():
        fully_shard(model)
        total, trainable, sq = mu._get_model_param_stats(model)
    assert sq == pytest.approx(expected, rel=1e-9) and math.isfinite(sq) and trainable == total
