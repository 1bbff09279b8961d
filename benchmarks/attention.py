"""Causal attention on CPU: seekformer's blocked matrix products vs SDPA's fused kernel, per layer.

    python benchmarks/attention.py [--batch 4 --heads 8 --seq 512 --qk-dim 96 --v-dim 64 --repeats 8]

The shapes default to the V3-style benchmark model's MLA (q/k 64+32, v 64). SDPA gets V zero-padded
to the q/k head dim, as seekformer did before (unequal head dims send SDPA to its slow math path).
Prints forward and forward + backward milliseconds, the ratio, and each one's max error against a
float64 computation, for fp32 inputs and under bf16 autocast.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import machine, median_seconds

from seekformer.model.blocked_attention import blocked_causal_attention


def sdpa(q, k, v, scale):
    padded = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
    return F.scaled_dot_product_attention(q, k, padded, is_causal=True, scale=scale)[..., : v.shape[-1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--qk-dim", type=int, default=96)
    parser.add_argument("--v-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    print(f"# causal attention, batch {args.batch} x {args.heads} heads x {args.seq} tokens, "
          f"q/k {args.qk_dim}, v {args.v_dim}; {machine()}")
    print("| compute | pass | SDPA fused ms | blocked ms | ratio | max error SDPA / blocked (vs float64) |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.seq)
    q, k = (torch.randn(*shape, args.qk_dim, generator=gen) for _ in range(2))
    v = torch.randn(*shape, args.v_dim, generator=gen)
    grad = torch.randn(*shape, args.v_dim, generator=gen)
    scale = args.qk_dim**-0.5
    expected = sdpa(q.double(), k.double(), v.double(), scale)
    for mode in ("fp32", "bf16"):
        def run(fn, backward: bool):
            leaves = [t.clone().requires_grad_(backward) for t in (q, k, v)]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                out = fn(*leaves, scale)
            if backward:
                out.float().backward(grad)
            return out

        errors = [(run(fn, False).double() - expected).abs().max().item() for fn in (sdpa, blocked_causal_attention)]
        for name, backward in (("forward", False), ("forward + backward", True)):
            with torch.set_grad_enabled(backward):
                fused = median_seconds(lambda: run(sdpa, backward), args.repeats)
                blocked = median_seconds(lambda: run(blocked_causal_attention, backward), args.repeats)
            print(f"| {mode} | {name} | {1e3 * fused:.1f} | {1e3 * blocked:.1f} | {fused / blocked:.2f}x "
                  f"| {errors[0]:.1e} / {errors[1]:.1e} |", flush=True)


if __name__ == "__main__":
    main()
