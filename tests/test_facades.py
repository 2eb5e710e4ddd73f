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
    shared = pytest.importorskip("nemo_automodel.shared.tied_weights")  # where 0.7.0 keeps the private tie helpers
    for name in names:
        a, b = getattr(ours, name), getattr(ref, name, None) or getattr(shared, name, None)
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


@pytest.mark.reference
def test_tied_source_names_skip_non_string_entries_like_the_reference():
    ref = pytest.importorskip("nemo_automodel.components.checkpoint.utils")
    import tiny_models as tm

    model = tm.tiny_llama(tie_word_embeddings=True)
    model._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight", 3: "x", "lm_head.weight2": None}
    assert cu.get_tied_lm_head_source_names(model) == ref.get_tied_lm_head_source_names(model)
    assert all(isinstance(n, str) for n in cu.get_tied_lm_head_source_names(model))


@pytest.mark.reference
@pytest.mark.parametrize("kwargs", [{}, {"use_safetensors": False}, {"variant": "fp16"}, {"variant": "fp16", "use_safetensors": False}])
def test_checkpoint_dtypes_honour_variant_and_use_safetensors_like_the_reference(tmp_path, kwargs):
    """A directory with four weight sets of different dtypes: each choice must read the same files as the reference."""
    ref = pytest.importorskip("nemo_automodel.components.checkpoint.utils")
    import torch
    from safetensors.torch import save_file

    import tiny_models as tm

    model = tm.tiny_llama()
    model.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for name, dtype in (("model.safetensors", torch.float32), ("model.fp16.safetensors", torch.float16)):
        save_file({k: v.to(dtype) for k, v in state.items()}, str(tmp_path / name), metadata={"format": "pt"})
    for name, dtype in (("pytorch_model.bin", torch.bfloat16), ("pytorch_model.fp16.bin", torch.float64)):
        torch.save({k: v.to(dtype) for k, v in state.items()}, tmp_path / name)
    load_kwargs = {"local_files_only": True, **kwargs}
    ours = cu._get_checkpoint_tensor_dtypes(str(tmp_path), model.config, load_kwargs)
    theirs = ref._get_checkpoint_tensor_dtypes(str(tmp_path), model.config, load_kwargs)
    assert ours == theirs and len(set(ours.values())) == 1
