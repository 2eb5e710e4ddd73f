"""Case 1: setup surgery at scale on the meta device, ours vs NeMo AutoModel 0.7.0 and Lightning.

Models (all on meta, built once per model and reused; ``requires_grad`` is reset before every timed call):

* a 70B-class llama (hidden 8192, 80 layers, 64 heads, 8 KV heads, intermediate 28672, vocab 128256);
* DeepSeek-V3 at full size (61 layers, 256 routed experts) as transformers 5 builds it (experts fused
  into one 3-D tensor per layer), and the same model with *per-expert* modules, the layout of the
  released checkpoints and of transformers 4.x, which has ~45,000 parameter tensors: the case where a
  per-tensor cost shows;
* a Gemma-3n-like KV-sharing model: the real Gemma 3n text architecture (35 layers,
  ``num_kv_shared_layers=15``, the E4B layout) with the K/V projections and norms that the shared
  layers carry in released checkpoints put back (transformers 5 no longer builds them), so the dead
  parameters exist.

Every pair is checked to produce the same frozen set before it is timed.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

import torch
from lightning.pytorch.utilities.model_summary import ModelSummary
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from benchmarks.harness import CaseResult, Row, alternate, reset_peak_rss, rss_kib
from lightning_automodel.core.dead_params import freeze_dead_parameters
from lightning_automodel.model_utils import freeze_unused_kv_sharing_params
from lightning_automodel.core.freezing import apply_parameter_freezing
from lightning_automodel.core.parameters import count_parameters, module_breakdown
from lightning_automodel.core.model_build import build_meta_model

REF = "nemo-automodel 0.7.0"
NEVER_SLOWER = "never slower than the reference"

LLAMA_70B = dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                 intermediate_size=28672, vocab_size=128256)
DEEPSEEK_V3 = dict(hidden_size=7168, num_hidden_layers=61, n_routed_experts=256, moe_intermediate_size=2048,
                   intermediate_size=18432, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
                   kv_lora_rank=512, first_k_dense_replace=3, vocab_size=129280)


def build(config: PretrainedConfig) -> PreTrainedModel:
    """``core.model_build.build_meta_model``: parameters and buffers on meta, nothing allocated (fit's build)."""
    return build_meta_model(config)


def llama(smoke: bool) -> PreTrainedModel:
    kw = dict(LLAMA_70B)
    if smoke:
        kw.update(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024)
    return build(AutoConfig.for_model("llama", **kw))


def deepseek(smoke: bool, per_expert: bool) -> PreTrainedModel:
    """DeepSeek-V3 on meta; with ``per_expert`` each expert is its own MLP module (3 tensors each)."""
    kw = dict(DEEPSEEK_V3)
    if smoke:
        kw.update(num_hidden_layers=4, n_routed_experts=8, hidden_size=128, moe_intermediate_size=64,
                  intermediate_size=256, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64,
                  kv_lora_rank=32, first_k_dense_replace=1, vocab_size=512)
    config = AutoConfig.for_model("deepseek_v3", **kw)
    model = build(config)
    if per_expert:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP

        with torch.device("meta"):
            for layer in model.model.layers[config.first_k_dense_replace:]:
                layer.mlp.experts = nn.ModuleList(
                    DeepseekV3MLP(config, intermediate_size=config.moe_intermediate_size)
                    for _ in range(config.n_routed_experts)
                )
    return model


def gemma3n_kv_shared(smoke: bool) -> PreTrainedModel:
    """Gemma 3n text on meta with the dead K/V modules of the shared layers restored."""
    layers, shared = (6, 2) if smoke else (35, 15)
    kw = dict(num_hidden_layers=layers, num_kv_shared_layers=shared)
    if smoke:
        kw.update(hidden_size=64, intermediate_size=[128] * layers, vocab_size=512, vocab_size_per_layer_input=512,
                  hidden_size_per_layer_input=8, activation_sparsity_pattern=[0.0] * layers,
                  layer_types=["sliding_attention", "full_attention"] * (layers // 2))
    config = AutoConfig.for_model("gemma3n_text", **kw)
    model = build(config)
    kv_out = config.num_key_value_heads * config.head_dim
    with torch.device("meta"):
        for layer in model.model.layers[layers - shared:]:
            attn = layer.self_attn
            for proj in ("k_proj", "v_proj"):
                if not isinstance(getattr(attn, proj, None), nn.Module):
                    setattr(attn, proj, nn.Linear(config.hidden_size, kv_out, bias=False))
            for norm in ("k_norm", "v_norm"):
                if not any(True for _ in getattr(attn, norm, nn.Identity()).parameters()):
                    setattr(attn, norm, nn.LayerNorm(config.head_dim))
    return model


def _reset(model: nn.Module) -> Callable[[], None]:
    def run() -> None:
        for p in model.parameters():
            p.requires_grad_(True)

    return run


def _frozen(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def _same_effect(model: nn.Module, ours: Callable[[], object], ref: Callable[[], object]) -> bool:
    _reset(model)()
    ours()
    a = _frozen(model)
    _reset(model)()
    ref()
    b = _frozen(model)
    _reset(model)()
    return a == b


def _timed(title: str, model: nn.Module, impls: dict[str, Callable[[], object]], repeats: int, smoke: bool,
           *, reset: bool = True, target: str = NEVER_SLOWER, ours: str = "ours") -> CaseResult:
    times = alternate(impls, repeats, setup=_reset(model) if reset else None)
    result = CaseResult(title, ours=ours, target=target)
    result.rows = [Row(name, values, "s") for name, values in times.items()]
    if target == NEVER_SLOWER and not smoke:
        # 5% allowance: the two medians of sub-millisecond calls wobble by that much between runs.
        result.met = result.rows[0].median <= result.rows[1].median * 1.05
    return result


def _lightning_holder(model: nn.Module):
    import lightning.pytorch as pl

    holder = pl.LightningModule()
    holder.model = model
    return holder


def _model_cases(label: str, model: PreTrainedModel, build_s: float, repeats: int, smoke: bool) -> list[CaseResult]:
    import nemo_automodel.components.utils.model_utils as ref

    n_tensors = sum(1 for _ in model.parameters())
    param_gib = count_parameters(model).total * 2 / 2**30
    tag = f"{label} on meta ({n_tensors:,} tensors)"
    results = []
    legacy = {"freeze_language_model": True, "freeze_audio_tower": True}
    globs = {"freeze_modules": [{"glob": "model.layers.*.mlp*"}], "unfreeze_modules": [{"glob": "model.layers.1.*"}]}
    # Ours alone first, before any other code has grown the heap (freed heap is reused without new RSS).
    reset_peak_rss()
    ours_base = rss_kib("VmRSS")
    apply_parameter_freezing(model, legacy)
    apply_parameter_freezing(model, globs)
    count_parameters(model)
    freeze_dead_parameters(model)
    module_breakdown(model)
    ours_delta = (rss_kib("VmHWM") - ours_base) / 1024
    _reset(model)()
    reset_peak_rss()
    rss_base = rss_kib("VmRSS")
    for cfg_label, cfg in (("legacy flags", legacy), ("glob selectors", globs)):
        ours_fn = lambda cfg=cfg: apply_parameter_freezing(model, cfg)  # noqa: E731
        ref_fn = lambda cfg=cfg: ref.apply_parameter_freezing(model, cfg)  # noqa: E731
        same = _same_effect(model, ours_fn, ref_fn)
        r = _timed(f"1. Freezing ({cfg_label}) on a {tag}", model, {"ours": ours_fn, REF: ref_fn}, repeats, smoke)
        r.notes.append(f"Same frozen set as the reference: {'yes' if same else '**no**'}.")
        if cfg_label == "legacy flags":
            r.notes.append("`freeze_language_model` + `freeze_audio_tower` (+ the implied vision freeze) on a text-only model: "
                           "nothing matches, so this measures the scan of every module path that both sides must do.")
        results.append(r)
    r = _timed(f"1. Parameter counting on a {tag}", model,
               {"ours": lambda: count_parameters(model), REF: lambda: ref.count_model_parameters(model)},
               repeats, smoke, reset=False)
    if r.met is False:
        r.notes.append("Why missed: both make the same single traversal; per tensor, ours makes two extra Python calls "
                       "(`logical_numel` -> `_is_params4bit`, which looks bitsandbytes up in `sys.modules` each time) where the "
                       "reference has an inline `isinstance`. Resolving the Params4bit class once per call would close it.")
    results.append(r)
    ref_dead = lambda: (ref.freeze_unused_kv_sharing_params(model), ref.freeze_deepseek_v4_indexer_params(model),  # noqa: E731
                        ref.freeze_minimax_m3_indexer_params(model))
    r = _timed(f"1. All dead-parameter rules on a {tag} (no rule applies)", model,
               {"ours": lambda: freeze_dead_parameters(model), REF: ref_dead}, repeats, smoke)
    r.notes.append("No rule applies, so both sides only read the config: tens of microseconds per call, once per run.")
    if r.met is False:
        r.notes.append("Why missed: the whole cost is attribute reads on the transformers config, whose `__getattribute__` "
                       "costs a few µs each (profiled): ours makes 7 reads per call (the model types are read once per indexer "
                       "rule), the reference 5. Reading the model types once per call would close the gap.")
    results.append(r)
    holder = _lightning_holder(model)
    r = _timed(f"1. Summary statistics on a {tag}", model,
               {"ours (counts + per-module breakdown)": lambda: module_breakdown(model),
                "Lightning ModelSummary(max_depth=2)": lambda: ModelSummary(holder, max_depth=2).total_parameters},
               repeats, smoke, reset=False, ours="ours (counts + per-module breakdown)",
               target="report (the reference's print_trainable_parameters raises on meta: `.item()` of a meta tensor)")
    r.notes.append("Ours also attributes every frozen tensor to the rule that froze it.")
    results.append(r)
    rss_delta = (rss_kib("VmHWM") - rss_base) / 1024
    results[0].notes.append(
        f"Model build on meta: {build_s:.2f} s (once, reused). Peak resident growth over ours' surgery alone (both "
        f"freezes, counting, dead parameters, breakdown): {max(ours_delta, 0):.1f} MiB; over every implementation and "
        f"repetition of this model: {max(rss_delta, 0):.1f} MiB; against {param_gib:,.0f} GiB of parameters in bf16 had "
        "they been real. No parameter storage is allocated; the growth is Python objects (name lists, summaries)."
    )
    return results


def _direct_kv_freeze(model: PreTrainedModel) -> int:
    """What a rule that skips the full traversal would cost: visit only the shared layers' K/V modules."""
    cfg = model.config
    frozen = 0
    for layer in model.model.layers[cfg.num_hidden_layers - cfg.num_kv_shared_layers:]:
        for name in ("k_proj", "v_proj", "k_norm", "v_norm"):
            module = getattr(layer.self_attn, name, None)
            if isinstance(module, nn.Module):
                for p in module.parameters():
                    p.requires_grad_(False)
                    frozen += 1
    return frozen


def _kv_case(repeats: int, smoke: bool) -> list[CaseResult]:
    import nemo_automodel.components.utils.model_utils as ref

    start = time.perf_counter()
    model = gemma3n_kv_shared(smoke)
    build_s = time.perf_counter() - start
    cfg = model.config
    n_tensors = sum(1 for _ in model.parameters())
    ours_fn = lambda: freeze_unused_kv_sharing_params(model)  # noqa: E731
    ref_fn = lambda: ref.freeze_unused_kv_sharing_params(model)  # noqa: E731
    same = _same_effect(model, ours_fn, ref_fn) and _same_effect(model, ours_fn, lambda: _direct_kv_freeze(model))
    ours_fn()
    n_dead = len(_frozen(model))
    reset_peak_rss()
    rss_base = rss_kib("VmRSS")
    r = _timed(
        f"1. KV-sharing freeze on a Gemma-3n-like {cfg.num_hidden_layers}-layer model, {cfg.num_kv_shared_layers} shared, "
        f"on meta ({n_tensors} tensors, {n_dead} dead)",
        model,
        {"ours": ours_fn, REF: ref_fn,
         "ours, all three rules in one pass": lambda: freeze_dead_parameters(model),
         "floor: one named_parameters() traversal": lambda: list(model.named_parameters()),
         "sketch (not shipped): index the shared layers directly": lambda: _direct_kv_freeze(model)},
        repeats, smoke, target="at least 5× faster than the reference")
    rss_delta = (rss_kib("VmHWM") - rss_base) / 1024
    if not smoke:
        r.met = r.rows[1].median >= 5 * r.rows[0].median
        floor_ratio = r.rows[1].median / r.rows[3].median
        if not r.met:
            r.notes.append(
                f"Why missed: ours visits every parameter once (its cost tracks the floor row), and that traversal alone is "
                f"only {floor_ratio:.1f}× cheaper than the reference here; the reference adds "
                f"{cfg.num_kv_shared_layers} layers × 4 substring tests per parameter. 5× needs a rule that does not walk "
                f"the whole model: index the decoder's shared layers directly (`<layers>[{cfg.num_hidden_layers - cfg.num_kv_shared_layers}:]"
                ".self_attn.{k,v}_{proj,norm}`), which touches only the dead tensors (the sketch row, same frozen set)."
            )
    r.notes.append(f"Same frozen set as the reference (and the sketch): {'yes' if same else '**no**'}.")
    r.notes.append(f"Model build on meta: {build_s:.2f} s. Peak resident growth during the timed surgery: {max(rss_delta, 0):.1f} MiB.")
    return [r]


def indexer_model(model_type: str, smoke: bool) -> PreTrainedModel:
    """DeepSeek-V4 / MiniMax-M3 at transformers' default (full) size on meta; a quarter of MiniMax's layers dense."""
    config = AutoConfig.for_model(model_type)
    n = 4 if smoke else config.num_hidden_layers
    kw: dict = {"num_hidden_layers": n}
    if model_type.startswith("minimax_m3"):
        kw["layer_types"] = ["full_attention" if i % 4 == 0 else "minimax_m3_sparse" for i in range(n)]
    else:
        kw["layer_types"] = list(config.layer_types[:n])
    if getattr(config, "mlp_layer_types", None):
        kw["mlp_layer_types"] = list(config.mlp_layer_types[:n])
    if smoke:
        kw.update(vocab_size=512)
    config = AutoConfig.for_model(model_type, **kw)
    with torch.device("meta"):  # nothing allocated: the fused expert tensors are large
        return AutoModelForCausalLM.from_config(config)


def _indexer_cases(repeats: int, smoke: bool) -> list[CaseResult]:
    import nemo_automodel.components.utils.model_utils as ref

    results = []
    for model_type, ref_rule in (("deepseek_v4", ref.freeze_deepseek_v4_indexer_params),
                                 ("minimax_m3_vl_text", ref.freeze_minimax_m3_indexer_params)):
        start = time.perf_counter()
        model = indexer_model(model_type, smoke)
        build_s = time.perf_counter() - start
        ref_all = lambda: (ref.freeze_unused_kv_sharing_params(model), ref.freeze_deepseek_v4_indexer_params(model),  # noqa: E731
                           ref.freeze_minimax_m3_indexer_params(model))
        ours_fn = lambda: freeze_dead_parameters(model)  # noqa: E731
        same = _same_effect(model, ours_fn, ref_all)
        ours_fn()
        n_dead = len(_frozen(model))
        n_tensors = sum(1 for _ in model.parameters())
        layers = model.config.num_hidden_layers
        r = _timed(f"1. All dead-parameter rules on {model_type} ({layers} layers, on meta: {n_tensors:,} tensors, "
                   f"{n_dead} dead indexer tensors)", model, {"ours": ours_fn, REF: ref_all}, repeats, smoke)
        r.notes.append(f"Same frozen set as the reference: {'yes' if same else '**no**'}. Model build on meta: {build_s:.2f} s.")
        if r.met is False:
            r.notes.append(
                "Why missed: both make one traversal; per tensor, the reference then makes one substring test, while ours "
                "runs a loop of its own (de-duplication of tied tensors by id, a canonical name with wrapper prefixes "
                "stripped so the rule survives activation checkpointing and torch.compile, a method call per bound rule): "
                "profiled, about a quarter of ours' time. Iterating `named_parameters()` (which already de-duplicates) and "
                "skipping `canonical_name` for names without a wrapper prefix would remove most of it."
            )
        results.append(r)
        del model
    return results


def run(smoke: bool, repeats: int) -> list[CaseResult]:
    logging.getLogger("lightning_automodel").setLevel(logging.WARNING)
    logging.getLogger("nemo_automodel").setLevel(logging.WARNING)
    results = []
    builders = (
        ("70B-class llama", lambda: llama(smoke)),
        ("DeepSeek-V3-size MoE (fused experts, transformers 5)", lambda: deepseek(smoke, per_expert=False)),
        ("DeepSeek-V3-size MoE (per-expert modules)", lambda: deepseek(smoke, per_expert=True)),
    )
    for label, make in builders:
        start = time.perf_counter()
        model = make()
        cases = _model_cases(label, model, time.perf_counter() - start, repeats, smoke)
        results += cases
        del model
    results += _kv_case(repeats, smoke)
    results += _indexer_cases(repeats, smoke)
    return results


if __name__ == "__main__":
    for res in run("--smoke" in sys.argv, 1):
        print(res.markdown())
