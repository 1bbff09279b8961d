"""Routed-expert kernels on this machine: per-expert loop vs one grouped GEMM (`F.grouped_mm`),
forward + backward, against one dense matmul of the same FLOPs as the floor.

    python benchmarks/experts.py [--experts 32 --top-k 4 --tokens 2048 --hidden 512 --expert-dim 256]

`Experts.implementation = "auto"` uses the result: loop on CPU, grouped GEMM on CUDA bf16.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import machine, median_seconds

from seekformer import ModelConfig
from seekformer.model.moe import MoE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--expert-dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    config = ModelConfig.preset(
        "tiny-v3", hidden_size=args.hidden, moe_intermediate_size=args.expert_dim, n_routed_experts=args.experts,
        num_experts_per_tok=args.top_k, n_group=1, topk_group=1)
    print(f"# {args.experts} experts top-{args.top_k}, {args.tokens} tokens, hidden {args.hidden}, "
          f"expert dim {args.expert_dim}; forward+backward; {machine()}")
    print("| dtype | loop ms | grouped_mm ms | dense same-FLOPs ms | loop / grouped |")
    print("|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        moe = MoE(config).to(dtype)
        for p in moe.parameters():
            torch.nn.init.normal_(p, 0, 0.02)
        x = torch.randn(args.tokens, args.hidden, dtype=dtype, requires_grad=True)
        with torch.no_grad():
            route = moe.gate(x)
        times = {}
        for impl in ("loop", "grouped_mm"):
            moe.experts.implementation = impl

            def step():
                moe.experts(x, route).sum().backward()

            times[impl] = median_seconds(step, args.repeats) * 1000
        w1 = torch.randn(args.hidden, 2 * args.expert_dim * args.top_k, dtype=dtype, requires_grad=True)
        w2 = torch.randn(args.expert_dim * args.top_k, args.hidden, dtype=dtype, requires_grad=True)

        def dense():
            g, u = (x @ w1).chunk(2, dim=-1)
            (F.silu(g) * u @ w2).sum().backward()

        floor = median_seconds(dense, args.repeats) * 1000
        print(f"| {str(dtype).replace('torch.', '')} | {times['loop']:.1f} | {times['grouped_mm']:.1f} | "
              f"{floor:.1f} | {times['loop'] / times['grouped_mm']:.2f} |")


if __name__ == "__main__":
    main()
