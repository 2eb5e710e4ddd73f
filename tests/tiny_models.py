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
