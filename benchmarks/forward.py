"""Prefill throughput: seekformer vs transformers' DeepseekV3ForCausalLM, same config and weights.

    python benchmarks/forward.py [--batch 4 --seq 512 --repeats 5]

Prints tokens/s for fp32 and bf16 weights and the ratio seekformer / transformers.
"""

from __future__ import annotations

import argparse

import torch
from common import V3_STYLE, build_pair, machine, median_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    print(f"# prefill, V3-style config {V3_STYLE['hidden_size']} hidden, {V3_STYLE['num_hidden_layers']} layers, "
          f"{V3_STYLE['n_routed_experts']} experts top-{V3_STYLE['num_experts_per_tok']}; "
          f"batch {args.batch} x {args.seq} tokens; {machine()}")
    print("| dtype | transformers tok/s | seekformer tok/s | ratio | max abs logit diff |")
    print("|---|---|---|---|---|")
    ids = torch.randint(0, V3_STYLE["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    tokens = args.batch * args.seq
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        reference, ours = build_pair(dtype)
        with torch.inference_mode():
            t_ref = median_seconds(lambda: reference(ids).logits, args.repeats)
            t_ours = median_seconds(lambda: ours(ids), args.repeats)
            diff = (reference(ids).logits.float() - ours(ids).float()).abs().max().item()
        print(f"| {name} | {tokens / t_ref:,.0f} | {tokens / t_ours:,.0f} | {t_ref / t_ours:.2f}x | {diff:.2e} |")


if __name__ == "__main__":
    main()
