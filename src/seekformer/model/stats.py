"""Parameter counts, per-token compute and KV-cache sizes of a model or config (no weights needed:
the model can live on the meta device)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .moe import MoE


@dataclass
class ParamCounts:
    total: int  # main model, embedding and output head included (tied weights counted once)
    active: int  # used per token, as DeepSeek counts them: the output head but not the embedding table (a
    # lookup, no products), routed experts for K of E, Engram tables for the rows read
    embedding: int  # embedding table(s) and output head
    mtp: int  # Multi-Token Prediction modules (their embedding/head are shared, not counted)
    engram: int  # Engram memory (tables and gates), part of total
    engram_lookup: int  # Engram table numbers read per token ((N-1) * dim_per_ngram per layer): active, no FLOPs
    routed_experts: int  # all routed experts, part of total


def count_parameters(model: nn.Module) -> ParamCounts:
    config: ModelConfig = model.config
    seen: set[int] = set()

    def numel(module: nn.Module) -> int:
        n = 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    embedding_table = numel(model.model.embed_tokens)  # also the head when tied: then counted as the head
    embedding = embedding_table + numel(model.lm_head)
    mtp = numel(model.mtp)
    engram = engram_lookup = 0
    routed = inactive = 0
    for layer in model.model.layers:
        if getattr(layer, "engram", None) is not None:
            table = layer.engram.table.weight.numel()
            lookup = (config.engram_max_ngram - 1) * config.engram_dim_per_ngram
            engram += numel(layer.engram)
            engram_lookup += lookup
            inactive += table - lookup
        if isinstance(layer.mlp, MoE):
            n = numel(layer.mlp.experts)
            routed += n
            inactive += n - n * config.num_experts_per_tok // config.n_routed_experts
    body = numel(model.model)  # what is left after the parts above
    total = embedding + engram + routed + body
    if not config.tie_word_embeddings:
        inactive += embedding_table
    return ParamCounts(total=total, active=total - inactive, embedding=embedding, mtp=mtp, engram=engram,
                       engram_lookup=engram_lookup, routed_experts=routed)


def kv_cache_bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(bytes this model caches per token, bytes the equivalent MHA cache would take), all layers."""
    size = torch.empty((), dtype=dtype).element_size()
    layers = config.num_hidden_layers
    if config.is_mla:
        cached = layers * (config.kv_lora_rank + config.qk_rope_head_dim) * size
        mha = layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * size
    else:
        cached = layers * 2 * config.num_key_value_heads * config.attn_head_dim * size
        mha = layers * 2 * config.num_attention_heads * config.attn_head_dim * size
    return cached, mha


def flops_per_token(config: ModelConfig, counts: ParamCounts, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 2 per active weight (the output head included, the embedding and Engram
    table lookups are reads, not products) and the attention score/value products over the causal
    context (on average (T+1)/2 keys); x3 for training (forward + backward)."""
    dense = counts.active - counts.engram_lookup
    if config.is_mla:
        per_key = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    else:
        per_key = 2 * config.num_attention_heads * config.attn_head_dim
    attention = config.num_hidden_layers * 2 * per_key * (seq_len + 1) / 2
    forward = 2 * dense + attention
    return 3 * forward if training else forward
