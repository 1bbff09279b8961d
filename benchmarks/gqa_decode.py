"""Grouped-query attention of one decode step on CPU: the per-head copy of the cache that seekformer
made before, SDPA's `enable_gqa`, and the query heads of a group attending as rows of their key head
(`attention._attend_grouped_rows`, what seekformer does now).

    python benchmarks/gqa_decode.py [--repeats 20]

The three run interleaved in one process, so a machine shared with other work slows all alike;
printed: median milliseconds per call and each one's time relative to the rows path.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import machine, median_seconds

from seekformer.model.attention import _attend_grouped_rows

SHAPES = [  # (batch, query heads, key/value heads, head dim, cached tokens)
    (1, 64, 8, 128, 1024),  # DeepSeek LLM 67B's heads
    (1, 32, 8, 128, 4096),
    (4, 8, 2, 16, 256),  # tiny-llm
]


def per_head_copy(q, k, v, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def enable_gqa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)


def rows(q, k, v, scale):
    return _attend_grouped_rows(q, k, v, scale, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(machine())
    gen = torch.Generator().manual_seed(0)
    for B, H, KV, D, S in SHAPES:
        q = torch.randn(B, H, 1, D, generator=gen)
        k, v = torch.randn(B, KV, S, D, generator=gen), torch.randn(B, KV, S, D, generator=gen)
        times = {fn.__name__: [] for fn in (per_head_copy, enable_gqa, rows)}
        for _ in range(5):  # interleaved rounds
            for fn in (per_head_copy, enable_gqa, rows):
                times[fn.__name__].append(median_seconds(lambda fn=fn: fn(q, k, v, D**-0.5), args.repeats))
        best = {name: min(t) for name, t in times.items()}
        cells = ", ".join(f"{name} {t * 1e3:.3f} ms ({t / best['rows']:.2f}x)" for name, t in best.items())
        print(f"B={B} H={H} H_kv={KV} D={D} S={S}: {cells}")


if __name__ == "__main__":
    main()
