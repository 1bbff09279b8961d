"""Tiny random transformers models (the test oracle) and helpers shared by the tests."""

from __future__ import annotations

import torch
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 256

V3_BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=16,
    q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=4, topk_group=2,
    num_experts_per_tok=3, first_k_dense_replace=1, max_position_embeddings=256, num_nextn_predict_layers=0,
    routed_scaling_factor=2.5,
)
V2_BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8, kv_lora_rank=16,
    q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, num_experts_per_tok=2,
    first_k_dense_replace=1, max_position_embeddings=256, topk_method="greedy", routed_scaling_factor=1.0,
)
LLAMA_BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=2, max_position_embeddings=256,
)


def hf_model(kind: str, **overrides) -> torch.nn.Module:
    cls_cfg, cls_model, base = {
        "v3": (DeepseekV3Config, DeepseekV3ForCausalLM, V3_BASE),
        "v2": (DeepseekV2Config, DeepseekV2ForCausalLM, V2_BASE),
        "llama": (LlamaConfig, LlamaForCausalLM, LLAMA_BASE),
    }[kind]
    config = cls_cfg(**{**base, **overrides})
    return cls_model(config).eval()
