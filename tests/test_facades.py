"""The reference API imports from our façades with the same names and parameter names."""

import inspect
import logging

import pytest

import lightning_automodel.checkpoint_utils as cu
import lightning_automodel.model_utils as mu

MODEL_UTILS = [
    "_freeze_module_by_attribute_and_patterns", "_get_forward_signature", "_get_logical_numel",
    "_get_model_param_stats", "_supports_logits_to_keep", "_supports_seq_lens", "apply_parameter_freezing",
    "cast_mixed_dtype_params_to_bf16", "count_model_parameters", "enable_radio_vit_fused_attn",
    "filter_forward_kwargs", "freeze_deepseek_v4_indexer_params", "freeze_minimax_m3_indexer_params",
    "freeze_unused_kv_sharing_params", "get_lm_head_module", "get_lm_head_weight", "init_empty_weights",
    "print_trainable_parameters", "resolve_trust_remote_code", "skip_random_init", "squeeze_input_for_thd",
    "VLM_INPUT_KEYS", "logger",
]
CHECKPOINT_UTILS = [
    "_get_checkpoint_tensor_dtypes", "_get_module_by_normalized_name", "_normalize_param_name",
    "_same_tensor_storage", "ensure_tied_lm_head", "estimate_state_dict_bytes", "estimate_tensor_bytes",
    "format_bytes", "format_output_file_count", "get_input_embeddings_weight_and_name",
    "get_lm_head_weight_and_name", "get_rank_safe", "get_safetensors_index_total_size",
    "get_tied_lm_head_source_names", "get_world_size_safe", "has_local_tied_lm_head", "is_rank_0",
    "is_tied_word_embeddings", "materialize_missing_tied_lm_head", "resolve_trust_remote_code",
]


@pytest.mark.parametrize(("module", "names"), [(mu, MODEL_UTILS), (cu, CHECKPOINT_UTILS)])
def test_every_name_is_there(module, names):
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing


def _positional_names(fn):
    fn = inspect.unwrap(fn)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]


@pytest.mark.parametrize(
    ("ours", "ref_path", "names"),
    [
        (mu, "nemo_automodel.components.utils.model_utils", MODEL_UTILS),
        (cu, "nemo_automodel.components.checkpoint.utils", CHECKPOINT_UTILS),
    ],
)
def test_parameter_names_match_reference(ours, ref_path, names):
    ref = pytest.importorskip(ref_path)
    for name in names:
        a, b = getattr(ours, name), getattr(ref, name, None)
        if b is None or not callable(b) or isinstance(b, logging.Logger):
            continue
        theirs = _positional_names(b)
        mine = _positional_names(a)
        assert mine[: len(theirs)] == theirs, (name, mine, theirs)


def test_count_model_parameters_order_and_names():
    import tiny_models as tm

    model = tm.tiny_llama()
    model.lm_head.weight.requires_grad_(False)
    trainable, total = mu.count_model_parameters(model)
    counts = mu.count_model_parameters(model)
    assert counts.trainable == trainable < total == counts.total


def test_print_trainable_parameters_logs_once_on_rank0_via_module_logger(caplog, monkeypatch):
    import tiny_models as tm

    model = tm.tiny_llama()
    with caplog.at_level(logging.INFO, logger=mu.logger.name):
        assert mu.print_trainable_parameters(model, name="Draft") == tuple(mu.count_model_parameters(model))
    lines = [r.getMessage() for r in caplog.records if r.name == mu.logger.name]
    assert lines[0] == "Draft summary:" and len(lines) == 7 and lines[4].endswith("100.00%")
    caplog.clear()
    monkeypatch.setenv("RANK", "1")
    with caplog.at_level(logging.INFO, logger=mu.logger.name):
        mu.print_trainable_parameters(model)
    assert not [r for r in caplog.records if r.name == mu.logger.name]


def test_phi4mm_side_effect_kept():
    import torch

    import tiny_models as tm

    model = tm.tiny_llama()
    model.config.model_type = "phi4mm"
    model.config.use_cache = True
    mu.apply_parameter_freezing(model, {"freeze_vision_tower": False})
    assert model.config.use_cache is False and model.lm_head.weight.dtype == torch.bfloat16


def test_no_lightning_import_from_core_and_facades():
    import subprocess
    import sys

    code = "import sys, lightning_automodel.model_utils, lightning_automodel.checkpoint_utils; import lightning_automodel.core.freezing; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
