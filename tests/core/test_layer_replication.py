"""Layer replication: copies only where the constructor provably takes the same path, and exactly what it would build.

Every test compares a replicated build with a build that runs every constructor, through a
fingerprint written here (not the module's own): module classes, parameter and buffer metadata, and
every plain attribute (``layer_idx``, ``attention_type``, ``sliding_window``...). The replication
statistics are asserted too, so a test cannot pass by never copying anything.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from lightning_automodel.core.layer_replication import ReplicaMutationError, ReplicationStats, replicate_identical_layers
from lightning_automodel.models.building import build_on_meta

PLAIN = (bool, int, float, str, type(None), torch.dtype)
SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=4)


def fingerprint(root: nn.Module) -> list:
    out = []
    for name, module in root.named_modules(remove_duplicate=False):
        attrs = {}
        for key, value in vars(module).items():
            if key.startswith("_"):
                continue
            if isinstance(value, PLAIN) or (isinstance(value, (list, tuple)) and all(isinstance(v, PLAIN) for v in value)):
                attrs[key] = value
            else:
                attrs[key] = type(value).__name__
        out.append((name, type(module).__name__, sorted(attrs.items(), key=lambda kv: kv[0])))
        for pname, p in module.named_parameters(recurse=False):
            out.append((name, "param", pname, tuple(p.shape), p.dtype, p.requires_grad, p.device.type))
        for bname, b in module.named_buffers(recurse=False):
            out.append((name, "buffer", bname, tuple(b.shape), b.dtype, b.device.type))
    return out


def distinct_parameter_objects(model: nn.Module) -> int:
    return len({id(p) for _, p in model.named_parameters(remove_duplicate=False)})


ARCHITECTURES = {
    # name: (model_type, layers, extra config); each makes layer i's structure depend on i differently
    "llama": ("llama", 40, {}),
    "qwen2-sliding-after-3": ("qwen2", 40, {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 3}),
    "gemma3-pattern": ("gemma3_text", 40, {"sliding_window": 8}),
    "qwen3-moe-sparse-step": ("qwen3_moe", 40, {"mlp_only_layers": [1, 5], "decoder_sparse_step": 2, "num_experts": 4,
                                                "num_experts_per_tok": 2, "moe_intermediate_size": 8}),
    "deepseek-v3-first-dense": ("deepseek_v3", 30, {"first_k_dense_replace": 3, "n_routed_experts": 4, "num_experts_per_tok": 2,
                                                    "moe_intermediate_size": 8, "kv_lora_rank": 8, "q_lora_rank": 8,
                                                    "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 4,
                                                    "n_group": 1, "topk_group": 1}),
    "mixtral": ("mixtral", 30, {"num_local_experts": 3, "num_experts_per_tok": 2}),
    "gpt2": ("gpt2", 30, {"n_embd": 16, "n_head": 4}),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_replicated_build_equals_the_constructor_build(arch):
    model_type, layers, extra = ARCHITECTURES[arch]
    values = {**SMALL, **extra}
    if model_type == "gpt2":
        values = {k: v for k, v in values.items() if k not in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                               "num_key_value_heads", "head_dim")}
        values["n_layer"] = layers
    else:
        values["num_hidden_layers"] = layers
    config = AutoConfig.for_model(model_type, **values)
    stats = ReplicationStats()
    replicated = build_on_meta(config, "causal_lm", replication=stats)
    built = build_on_meta(config, "causal_lm")
    assert fingerprint(replicated) == fingerprint(built)
    assert distinct_parameter_objects(replicated) == distinct_parameter_objects(built)
    # Copies did happen: at most a handful of distinct layers were constructed.
    assert stats.total_replicated >= layers - 6, stats
    assert sum(stats.built.values()) + stats.total_replicated == layers, stats


def test_per_layer_pattern_makes_its_own_variants():
    """gemma3's 5 sliding + 1 full pattern: exactly two constructor runs, and the full layers land where the config says."""
    config = AutoConfig.for_model("gemma3_text", num_hidden_layers=24, sliding_window=8, **SMALL)
    stats = ReplicationStats()
    model = build_on_meta(config, "causal_lm", replication=stats)
    assert stats.built == {"Gemma3DecoderLayer": 2}
    kinds = [layer.self_attn.layer_type for layer in model.model.layers]
    assert kinds == list(config.layer_types) and kinds.count("full_attention") == 4
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [
        8 if kind == "sliding_attention" else None for kind in kinds
    ]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == list(range(24))


# ---- constructors written to defeat the proof ---------------------------------------------------------


class TinyConfig(PretrainedConfig):
    model_type = "tiny-replication-test"

    def __init__(self, width: int = 4, pattern: tuple = ("a", "b", "b"), kinds: list | None = None, **kwargs):
        self.width = width
        self.pattern = pattern
        self.kinds = kinds if kinds is not None else ["x", "y", "x", "x"]
        super().__init__(**kwargs)


class ModuloLayer(nn.Module):
    """Wider every third layer; keeps its index and a derived value."""

    def __init__(self, config: TinyConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.next_idx = layer_idx + 1
        wide = layer_idx % 3 == 0
        self.proj = nn.Linear(config.width, config.width * (2 if wide else 1))


class ConfigSequenceLayer(nn.Module):
    """Reads a config tuple and a config list by its index (the ``layer_types`` pattern)."""

    def __init__(self, config: TinyConfig, layer_idx: int):
        super().__init__()
        self.kind = config.kinds[layer_idx % len(config.kinds)]
        self.mode = config.pattern[layer_idx % len(config.pattern)]
        size = {"a": 2, "b": 3}[self.mode] * (2 if self.kind == "x" else 1)
        self.proj = nn.Linear(config.width, size)


class HashingLayer(nn.Module):
    """Looks its size up in a dict keyed by index: the value itself decides, so nothing can be shared."""

    SIZES = {i: 1 + i % 4 for i in range(100)}

    def __init__(self, config: TinyConfig, layer_idx: int):
        super().__init__()
        self.proj = nn.Linear(config.width, self.SIZES[layer_idx])


class ListHoldingLayer(nn.Module):
    """Keeps its index inside a list: a copy could not know to update it."""

    def __init__(self, config: TinyConfig, layer_idx: int):
        super().__init__()
        self.history = [layer_idx]
        self.proj = nn.Linear(config.width, config.width)


class TypeCheckingLayer(nn.Module):
    """Branches on the argument's type, which a probe cannot log: the structure check must catch it."""

    def __init__(self, config: TinyConfig, layer_idx: int):
        super().__init__()
        exact = type(layer_idx) is int
        self.proj = nn.Linear(config.width, config.width + (1 if exact else 0))


class KeywordLayer(nn.Module):
    """Two integer arguments, one by keyword; the block index decides, the expert count is constant."""

    def __init__(self, config: TinyConfig, *, block: int, experts: int):
        super().__init__()
        self.block = block
        self.experts = nn.ModuleList(nn.Linear(config.width, config.width) for _ in range(experts))
        self.gate = nn.Linear(config.width, experts) if block >= 2 else None


def build_layers(cls, n: int, *, replicate: bool, device: str = "meta", **extra):
    config = TinyConfig()
    stats = ReplicationStats()
    with torch.device(device):
        if replicate:
            with replicate_identical_layers([cls], stats=stats):
                layers = nn.ModuleList(_make(cls, config, i, extra) for i in range(n))
        else:
            layers = nn.ModuleList(_make(cls, config, i, extra) for i in range(n))
    return layers, stats


def _make(cls, config, i, extra):
    if cls is KeywordLayer:
        return cls(config, block=i, experts=extra.get("experts", 2))
    return cls(config, i)


@pytest.mark.parametrize(
    "cls, n, max_built",
    [
        (ModuloLayer, 30, 2),  # wide and narrow
        (ConfigSequenceLayer, 36, 6),  # lcm of the two pattern lengths is 12, four distinct sizes among them
        (KeywordLayer, 20, 2),  # block < 2 and block >= 2
    ],
)
def test_copies_equal_the_constructor_for_index_dependent_layers(cls, n, max_built):
    replicated, stats = build_layers(cls, n, replicate=True)
    built, _ = build_layers(cls, n, replicate=False)
    assert fingerprint(replicated) == fingerprint(built)
    assert sum(stats.built.values()) <= max_built, stats
    assert stats.total_replicated >= n - max_built, stats


def test_derived_integers_are_recomputed_for_each_copy():
    layers, stats = build_layers(ModuloLayer, 10, replicate=True)
    assert stats.total_replicated == 8
    assert [layer.layer_idx for layer in layers] == list(range(10))
    assert [layer.next_idx for layer in layers] == list(range(1, 11))


@pytest.mark.parametrize(
    "cls, reason",
    [
        (ListHoldingLayer, "kept in a list"),
        (TypeCheckingLayer, "different structure"),
    ],
)
def test_what_a_probe_cannot_prove_is_built(cls, reason):
    replicated, stats = build_layers(cls, 12, replicate=True)
    built, _ = build_layers(cls, 12, replicate=False)
    assert fingerprint(replicated) == fingerprint(built)
    assert stats.total_replicated == 0
    assert reason in stats.refused[cls.__name__]
    if cls is ListHoldingLayer:
        assert [layer.history for layer in replicated] == [[i] for i in range(12)]


def test_value_dependent_constructor_is_probed_a_bounded_number_of_times():
    replicated, stats = build_layers(HashingLayer, 40, replicate=True)
    built, _ = build_layers(HashingLayer, 40, replicate=False)
    assert fingerprint(replicated) == fingerprint(built)
    assert stats.total_replicated == 0 and stats.built == {"HashingLayer": 40}


def test_real_tensors_are_never_copied():
    """Copies carry shapes, not values: on a real device every layer is constructed."""
    layers, stats = build_layers(ModuloLayer, 6, replicate=True, device="cpu")
    assert stats.total_replicated == 0 and "meta" in stats.refused["ModuloLayer"]
    assert len({layer.proj.weight.data_ptr() for layer in layers}) == 6


def test_copies_have_their_own_parameters_and_refuse_hooks():
    layers, stats = build_layers(ModuloLayer, 6, replicate=True)
    assert stats.total_replicated == 4
    first, copy = layers[1], layers[4]  # 1 is the narrow representative, 4 a copy of it
    assert copy.proj.weight is not first.proj.weight
    copy.proj.weight.requires_grad_(False)
    assert first.proj.weight.requires_grad and layers[2].proj.weight.requires_grad
    copy.proj.weight.data = copy.proj.weight.data.to(torch.bfloat16)
    assert first.proj.weight.dtype == torch.float32
    with pytest.raises(ReplicaMutationError, match="copy made for planning"):
        copy.register_forward_hook(lambda *args: None)
    assert not layers[5]._forward_hooks
    first.register_forward_hook(lambda *args: None)  # the representative is a real build
    assert not copy._forward_hooks


def test_classes_are_restored_after_the_build():
    original = ModuloLayer.__init__
    with replicate_identical_layers([ModuloLayer]):
        assert ModuloLayer.__init__ is not original
    assert ModuloLayer.__init__ is original
    assert "__init__" not in KeywordLayer.__dict__ or KeywordLayer.__init__.__qualname__.startswith("KeywordLayer")


class CountingLayer(nn.Module):
    """No integer argument, but a global counter: a second construction differs, so nothing may be copied."""

    made = 0

    def __init__(self, config: TinyConfig):
        super().__init__()
        CountingLayer.made += 1
        self.serial = CountingLayer.made
        self.proj = nn.Linear(config.width, config.width)


class PlainLayer(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.proj = nn.Linear(config.width, config.width)
        self.norm = nn.LayerNorm(config.width)


@pytest.mark.parametrize("cls, copies", [(PlainLayer, 9), (CountingLayer, 0)])
def test_layers_without_integer_arguments(cls, copies):
    config = TinyConfig()
    stats = ReplicationStats()
    with torch.device("meta"), replicate_identical_layers([cls], stats=stats):
        layers = nn.ModuleList(cls(config) for _ in range(10))
    assert stats.total_replicated == copies
    if cls is CountingLayer:
        assert "different structure" in stats.refused["CountingLayer"]
        serials = [layer.serial for layer in layers]
        assert len(set(serials)) == 10  # every one a real construction
    else:
        with torch.device("meta"):
            built = nn.ModuleList(cls(config) for _ in range(10))
        assert fingerprint(layers) == fingerprint(built)


def test_vision_language_model_copies_both_towers():
    config = AutoConfig.for_model(
        "llava",
        text_config={"model_type": "llama", "num_hidden_layers": 12, **SMALL},
        vision_config={"model_type": "clip_vision_model", "num_hidden_layers": 10, "hidden_size": 16, "intermediate_size": 32,
                       "num_attention_heads": 4, "image_size": 16, "patch_size": 8},
        image_token_index=63,
    )
    stats = ReplicationStats()
    replicated = build_on_meta(config, "image_text_to_text", replication=stats)
    built = build_on_meta(config, "image_text_to_text")
    assert fingerprint(replicated) == fingerprint(built)
    assert stats.replicated == {"LlamaDecoderLayer": 11, "CLIPEncoderLayer": 9}, stats


def test_a_config_object_per_layer_is_probed_a_bounded_number_of_times():
    """Heterogeneous models hand each layer its own config: every call is a new key, so probes are capped per class."""
    probes = []
    original = ModuloLayer.__init__

    def counting(self, config, layer_idx):
        probes.append(layer_idx)
        original(self, config, layer_idx)

    stats = ReplicationStats()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ModuloLayer, "__init__", counting)
        with torch.device("meta"), replicate_identical_layers([ModuloLayer], max_variants=2, stats=stats):
            layers = nn.ModuleList(ModuloLayer(TinyConfig(), i) for i in range(40))
    assert stats.built == {"ModuloLayer": 40} and stats.total_replicated == 0
    assert len(probes) == 40 + 4 * 2  # every layer built once, plus at most 4 x max_variants probes
    assert [layer.layer_idx for layer in layers] == list(range(40))
