"""Shared pieces of the benchmarks: the V3-style config, building both models with equal weights, timing."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from seekformer import load_model

# a DeepSeek-V3-shaped model small enough for a 2-core CPU
V3_STYLE = dict(
    vocab_size=8192, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=8, n_shared_experts=1, n_routed_experts=64, num_experts_per_tok=6,
    n_group=8, topk_group=4, kv_lora_rank=128, q_lora_rank=192, qk_rope_head_dim=32, qk_nope_head_dim=64,
    v_head_dim=64, first_k_dense_replace=1, max_position_embeddings=8192, num_nextn_predict_layers=0,
)


def build_pair(dtype: torch.dtype, **overrides):
    """(transformers DeepseekV3ForCausalLM, seekformer Transformer) with the same random weights."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    reference = DeepseekV3ForCausalLM(DeepseekV3Config(**{**V3_STYLE, **overrides})).eval()
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        ours = load_model(tmp, dtype=dtype)
    return reference.to(dtype), ours


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine(device: str = "cpu") -> str:
    import platform

    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
