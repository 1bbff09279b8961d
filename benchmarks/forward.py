"""Prefill throughput: seekformer vs transformers' DeepseekV3ForCausalLM, same config and weights.

    python benchmarks/forward.py [--batch 4 --seq 512 --repeats 7 --threads N]

Prints tokens/s for fp32 and bf16 weights and the ratio seekformer / transformers. The two models
run in turn (interleaved, after one warm-up each), so a slow phase of a shared or virtualised
machine hits both; the table gives each model's best run and the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import V3_STYLE, build_pair, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# prefill, V3-style config {V3_STYLE['hidden_size']} hidden, {V3_STYLE['num_hidden_layers']} layers, "
          f"{V3_STYLE['n_routed_experts']} experts top-{V3_STYLE['num_experts_per_tok']}; "
          f"batch {args.batch} x {args.seq} tokens; {machine()}")
    print("| dtype | transformers tok/s (best) | seekformer tok/s (best) | ratio of bests | median ratio "
          "| max abs logit diff |")
    print("|---|---|---|---|---|---|")
    ids = torch.randint(0, V3_STYLE["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    tokens = args.batch * args.seq
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        reference, ours = build_pair(dtype)
        with torch.inference_mode():
            diff = (reference(ids).logits.float() - ours(ids).float()).abs().max().item()  # also the warm-up
            pairs = [(_seconds(lambda: reference(ids)), _seconds(lambda: ours(ids))) for _ in range(args.repeats)]
        t_ref, t_ours = min(p[0] for p in pairs), min(p[1] for p in pairs)
        ratio = statistics.median(r / o for r, o in pairs)
        print(f"| {name} | {tokens / t_ref:,.0f} | {tokens / t_ours:,.0f} | {t_ref / t_ours:.2f}x | {ratio:.2f}x "
              f"| {diff:.2e} |", flush=True)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
