"""Tiny Hugging Face models built from configs with random weights: no download, ever.

Every builder returns a real ``transformers`` model small enough for a CPU test (well under a
second to build after the first import). Shared by the whole test suite and the benchmarks.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

VOCAB = 256
_SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=256,
)


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    kwargs = {**_SMALL, **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def build(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def tiny_llama(tie_word_embeddings: bool = False, num_hidden_layers: int = 2, seed: int = 0) -> PreTrainedModel:
    return build(tiny_config("llama", tie_word_embeddings=tie_word_embeddings, num_hidden_layers=num_hidden_layers), seed)


def tiny_qwen3(seed: int = 0) -> PreTrainedModel:
    return build(tiny_config("qwen3"), seed)


def tiny_gemma3(seed: int = 0) -> PreTrainedModel:
    """Gemma3 text: tied embeddings by default (``lm_head.weight is embed_tokens.weight``)."""
    return build(tiny_config("gemma3_text"), seed)


def tiny_gemma3n(num_hidden_layers: int = 4, num_kv_shared_layers: int = 2, seed: int = 0) -> PreTrainedModel:
    n = num_hidden_layers
    cfg = tiny_config(
        "gemma3n_text",
        num_hidden_layers=n,
        num_kv_shared_layers=num_kv_shared_layers,
        vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8,
        laurel_rank=4,
        altup_num_inputs=2,
        intermediate_size=[128] * n,
        activation_sparsity_pattern=[0.0] * n,
        layer_types=(["sliding_attention", "full_attention"] * n)[:n],
    )
    return build(cfg, seed)


def tiny_gemma4(num_hidden_layers: int = 4, num_kv_shared_layers: int = 2, seed: int = 0) -> PreTrainedModel:
    n = num_hidden_layers
    cfg = tiny_config(
        "gemma4_text",
        num_hidden_layers=n,
        num_kv_shared_layers=num_kv_shared_layers,
        vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8,
        layer_types=(["sliding_attention", "full_attention"] * n)[:n],
    )
    return build(cfg, seed)


def tiny_deepseek_v4(seed: int = 0) -> PreTrainedModel:
    """DeepSeek V4 with one compressed-sparse-attention layer, so it has a ``compressor.indexer``."""
    cfg = AutoConfig.for_model(
        "deepseek_v4",
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        q_lora_rank=32,
        o_groups=2,
        o_lora_rank=16,
        hc_mult=2,
        index_n_heads=2,
        index_head_dim=16,
        index_topk=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        num_nextn_predict_layers=0,
        partial_rotary_factor=0.5,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        moe_intermediate_size=32,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention"],
        mlp_layer_types=["moe", "moe"],
        max_position_embeddings=256,
    )
    return build(cfg, seed)


def tiny_minimax_m3(seed: int = 0) -> PreTrainedModel:
    """MiniMax M3 text with one sparse-attention layer (it has ``self_attn.indexer``)."""
    cfg = AutoConfig.for_model(
        "minimax_m3_vl_text",
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rotary_dim=8,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        intermediate_size=64,
        dense_intermediate_size=128,
        shared_intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        index_n_heads=2,
        index_head_dim=16,
        index_block_size=4,
        index_topk_blocks=2,
        layer_types=["full_attention", "minimax_m3_sparse"],
        mlp_layer_types=["dense", "sparse"],
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=256,
    )
    return build(cfg, seed)


def tiny_llava(seed: int = 0) -> PreTrainedModel:
    """An image-text model (LLaVA: CLIP vision tower + projector + llama) with random weights."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = dict(
        model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32,
    )
    text = dict(model_type="llama", **_SMALL)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=VOCAB - 1, vocab_size=VOCAB)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(cfg)


# --- A synthetic Gemma-style KV-sharing model -------------------------------------------------
# transformers 5.x drops k_proj/v_proj/k_norm/v_norm from KV-shared layers, so the dead-parameter
# rule is a no-op on the real classes. This model keeps them (as older checkpoints and remote code
# do) and really reuses the last non-shared layer's K/V, so those tensors get no gradient.

import math as _math  # noqa: E402

from transformers import PretrainedConfig as _PretrainedConfig  # noqa: E402


class SyntheticKVConfig(_PretrainedConfig):
    model_type = "synthetic_kv_shared"

    def __init__(
        self,
        vocab_size: int = VOCAB,
        hidden_size: int = 32,
        num_hidden_layers: int = 4,
        num_kv_shared_layers: int = 2,
        with_vision: bool = False,
        tie_word_embeddings: bool = False,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_kv_shared_layers = num_kv_shared_layers
        self.with_vision = with_vision
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class _Attention(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_norm = nn.LayerNorm(hidden)
        self.v_norm = nn.LayerNorm(hidden)

    def forward(self, h: torch.Tensor, shared_kv: tuple[torch.Tensor, torch.Tensor] | None):
        q = self.q_proj(h)
        if shared_kv is None:
            k, v = self.k_norm(self.k_proj(h)), self.v_norm(self.v_proj(h))
        else:
            k, v = shared_kv
        scores = q @ k.transpose(-1, -2) / _math.sqrt(q.shape[-1])
        causal = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool, device=h.device).triu(1)
        attn = scores.masked_fill(causal, float("-inf")).softmax(-1)
        return self.o_proj(attn @ v), (k, v)


class _Layer(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.self_attn = _Attention(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, h, shared_kv):
        out, kv = self.self_attn(h, shared_kv)
        h = h + out
        return h + self.mlp(h), kv


class _Decoder(nn.Module):
    def __init__(self, config: SyntheticKVConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(_Layer(config.hidden_size) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.first_shared = config.num_hidden_layers - config.num_kv_shared_layers
        if config.with_vision:
            # A vision encoder with the same layer count and K/V names: alive, must never be frozen.
            self.vision_tower = nn.Module()
            self.vision_tower.encoder = nn.Module()
            self.vision_tower.encoder.layers = nn.ModuleList(_Layer(config.hidden_size) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids):
        h = self.embed_tokens(input_ids)
        kv = None
        for i, layer in enumerate(self.layers):
            h, new_kv = layer(h, kv if i >= self.first_shared else None)
            if i < self.first_shared:
                kv = new_kv
        return self.norm(h)


class SyntheticKVSharedLM(PreTrainedModel):
    config_class = SyntheticKVConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SyntheticKVConfig) -> None:
        super().__init__(config)
        self.model = _Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def get_decoder(self):
        return self.model

    def forward(self, input_ids, labels=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutput

        logits = self.lm_head(self.model(input_ids))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)


def synthetic_kv_shared(
    num_hidden_layers: int = 4, num_kv_shared_layers: int = 2, with_vision: bool = False,
    tie_word_embeddings: bool = False, seed: int = 0,
) -> SyntheticKVSharedLM:
    torch.manual_seed(seed)
    cfg = SyntheticKVConfig(
        num_hidden_layers=num_hidden_layers, num_kv_shared_layers=num_kv_shared_layers,
        with_vision=with_vision, tie_word_embeddings=tie_word_embeddings,
    )
    return SyntheticKVSharedLM(cfg)
