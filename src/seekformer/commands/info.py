"""`seekformer info PATH_OR_PRESET`: parameters, layer structure and KV-cache size of a model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..config import PRESETS, ModelConfig
from ..model.stats import count_parameters, kv_cache_bytes_per_token
from ..model.transformer import Transformer

HELP = "show parameters (total / active per token), layers and KV-cache bytes of a model or preset"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp8": torch.float8_e4m3fn}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="PATH_OR_PRESET",
                        help=f"a model directory / config.json, or a preset: {', '.join(PRESETS)}")
    parser.add_argument("--cache-dtype", choices=sorted(DTYPES), default="bf16",
                        help="dtype used for the KV-cache size (default bf16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--parallel", metavar="dp=N,ep=M",
                        help="also show memory per GPU and communication per step on N x M ranks")
    parser.add_argument("--tokens-per-rank", type=int, default=4096, metavar="T",
                        help="tokens per rank and optimizer step for --parallel (default 4096)")


def resolve_config(spec: str) -> tuple[str, ModelConfig]:
    path = Path(spec)
    if path.exists():
        return str(path), ModelConfig.from_hf(path)
    if spec in PRESETS:
        return spec, ModelConfig.preset(spec)
    raise FileNotFoundError(f"{spec!r} is neither a model directory/config.json nor a preset "
                            f"({', '.join(PRESETS)})")


def describe(config: ModelConfig, cache_dtype: torch.dtype = torch.bfloat16) -> dict:
    with torch.device("meta"):
        model = Transformer(config)
    counts = count_parameters(model)
    cached, mha = kv_cache_bytes_per_token(config, cache_dtype)
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    info = {
        "model_type": config.model_type,
        "parameters": {"total": counts.total, "active_per_token": counts.active,
                       "embedding_and_head": counts.embedding, "routed_experts": counts.routed_experts,
                       "mtp": counts.mtp, "engram": counts.engram},
        "layers": {"total": config.num_hidden_layers, "dense": config.num_hidden_layers - len(moe_layers),
                   "moe": len(moe_layers), "mtp": config.num_nextn_predict_layers,
                   "engram": list(config.engram_layer_ids)},
        "kv_cache_bytes_per_token": {"this_model": cached, "mha_equivalent": mha,
                                     "dtype": str(cache_dtype).replace("torch.", "")},
    }
    return info


def _b(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_text(name: str, config: ModelConfig, info: dict) -> str:
    p, layers, kv = info["parameters"], info["layers"], info["kv_cache_bytes_per_token"]
    c = config
    lines = [f"{name}  ({c.model_type})",
             f"  parameters      {_b(p['total'])} total, {_b(p['active_per_token'])} active per token"
             f" (embedding + head {_b(p['embedding_and_head'])}; active counts the head, not the embedding)"]
    if p["mtp"]:
        lines.append(f"  MTP             {layers['mtp']} module(s), {_b(p['mtp'])} (embedding and head shared)")
    if p["engram"]:
        lines.append(f"  Engram          layers {layers['engram']}, {_b(p['engram'])} parameters")
    if c.is_mla:
        q = f"q_lora {c.q_lora_rank}" if c.q_lora_rank else "no query compression"
        attn = (f"MLA, {c.num_attention_heads} heads, {q}, kv_lora {c.kv_lora_rank}, "
                f"qk {c.qk_nope_head_dim}+{c.qk_rope_head_dim} rope, v {c.v_head_dim}")
    else:
        kind = "MHA" if c.num_key_value_heads == c.num_attention_heads else "GQA"
        attn = f"{kind}, {c.num_attention_heads} heads / {c.num_key_value_heads} kv heads, head dim {c.attn_head_dim}"
    rope = f"RoPE theta {c.rope_theta:g}" + (f", YaRN x{c.rope_scaling['factor']}" if c.rope_type == "yarn" else "")
    lines.append(f"  attention       {attn}; {rope}; context {c.max_position_embeddings}")
    structure = f"{layers['total']} layers = {layers['dense']} dense"
    if layers["moe"]:
        groups = f", {c.n_group} groups keep {c.topk_group}" if c.uses_groups else ""
        structure += (f" + {layers['moe']} MoE ({c.n_routed_experts} routed top-{c.num_experts_per_tok}, "
                      f"{c.n_shared_experts or 0} shared, {c.scoring_func}, {c.topk_method}{groups})")
    lines.append(f"  layers          {structure}")
    ratio = kv["mha_equivalent"] / kv["this_model"]
    what = "MLA latent" if c.is_mla else "K/V"
    lines.append(f"  KV cache/token  {kv['this_model']:,} B ({what}, {kv['dtype']}) vs {kv['mha_equivalent']:,} B"
                 f" for the equivalent MHA cache ({ratio:.1f}x)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    name, config = resolve_config(args.model)
    info = describe(config, DTYPES[args.cache_dtype])
    footprint = None
    if args.parallel:
        from dataclasses import asdict

        from ..distributed.memory import format_footprint, parallel_footprint, parse_layout

        dp, ep = parse_layout(args.parallel)
        if config.is_moe and config.n_routed_experts % ep:
            raise ValueError(f"--parallel ep={ep} does not divide the model's {config.n_routed_experts} experts")
        footprint = parallel_footprint(config, dp, ep, args.tokens_per_rank)
        info["parallel"] = asdict(footprint)
    if args.json:
        print(json.dumps({"name": name, **info}, indent=2))
    else:
        print(format_text(name, config, info))
        if footprint is not None:
            print(format_footprint(footprint, args.tokens_per_rank))
    return 0
