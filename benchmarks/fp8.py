"""FP8 weights kept in memory (`load_model(..., keep_fp8=True)`) vs the same weights dequantised to bf16.

    PYTHONPATH=src python benchmarks/fp8.py [--new-tokens 32 --prompt 64 --batch 1 --repeats 5]

A V3-style model (benchmarks/common.py, with 4 layers and 16 routed experts top-4 to build quickly
on a shared 2-core machine) with random weights is written in the hub FP8 layout, then
loaded twice in bf16: dequantised at load, and with its FP8 weights kept (dequantised band by band
inside each product). Prints the weight memory of both and the greedy decode speed, timed in
interleaved pairs (dequantised, kept) so both see the same machine load; the ratio is per pair.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import V3_STYLE, machine

from seekformer import ModelConfig, Transformer, load_model
from seekformer.inference import generate

SIZE = dict(num_hidden_layers=4, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(all weights and buffers, those of the layers the hub stores in FP8 incl. their scales)."""
    state = model.state_dict()
    total = sum(t.numel() * t.element_size() for t in state.values())
    fp8_layers = sum(t.numel() * t.element_size() for k, t in state.items()
                     if k.endswith(("proj", "proj.weight", "proj_scale_inv", "proj.weight_scale_inv"))
                     and ".gate." not in k and "lm_head" not in k)
    return total, fp8_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = ModelConfig.from_hf({"model_type": "deepseek_v3", **V3_STYLE, **SIZE})
    with tempfile.TemporaryDirectory() as tmp:
        Transformer(config).save_pretrained(tmp, fp8=True)
        dense = load_model(tmp, dtype=torch.bfloat16)
        kept = load_model(tmp, dtype=torch.bfloat16, keep_fp8=True)
    print(f"machine: {machine()}", flush=True)
    (d_all, d_fp8), (k_all, k_fp8) = weight_bytes(dense), weight_bytes(kept)
    print(f"weights: dequantised bf16 {d_all / 2**20:.1f} MiB, kept FP8 {k_all / 2**20:.1f} MiB "
          f"({k_all / d_all:.2f}x); FP8 layers alone {d_fp8 / 2**20:.1f} -> {k_fp8 / 2**20:.1f} MiB "
          f"({k_fp8 / d_fp8:.3f}x)")
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt))

    def tokens_per_s(model) -> float:
        start = time.perf_counter()
        out = generate(model, prompt, max_new_tokens=args.new_tokens, stop_tokens=[])
        return sum(len(t) for t in out.tokens) / (time.perf_counter() - start)

    same = (generate(dense, prompt, max_new_tokens=8, stop_tokens=[]).tokens
            == generate(kept, prompt, max_new_tokens=8, stop_tokens=[]).tokens)
    print(f"greedy tokens identical (8 new): {same}")
    pairs = [(tokens_per_s(dense), tokens_per_s(kept)) for _ in range(args.repeats)]
    d, k = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    ratio = statistics.median(p[1] / p[0] for p in pairs)
    print(f"decode ({args.batch}x{args.prompt} prompt, {args.new_tokens} new, prefill included): dequantised bf16 "
          f"{d:.1f} tok/s, kept FP8 {k:.1f} tok/s; kept/dequantised {ratio:.2f}x (median of {args.repeats} pairs)")


if __name__ == "__main__":
    main()
