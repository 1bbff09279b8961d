"""Decode throughput: seekformer's absorbed MLA over the latent cache vs transformers' generate.

    python benchmarks/decode.py [--lengths 128,1024,4096 --batches 1,8 --new-tokens 32 --dtype bfloat16 --device cpu]

Same random weights and config (V3-style with a full-size latent: kv_lora_rank 512, rope dim 64,
16 heads), greedy, no stop token. Both prompts are prefilled in chunks of 512 tokens (transformers:
forward passes into its DynamicCache, then `generate` continues from that cache), and only the decode
phase is timed: from the first new token to the last (transformers: a streamer's timestamps); the
runs are interleaved and repeated (--repeats), the best of each counts.
Also prints the measured cache bytes per token of both, the seekformer naive-path speed (the same
cache, latent expanded every step) with --naive, and a correctness check: how many of seekformer's
greedy tokens are transformers' argmax given the same preceding tokens (teacher-forced through
transformers' cache; both output heads are scaled x30 for fewer near-ties). transformers' `generate`
itself is not the check: for prompts of ~700+ tokens its logits differ from its own forward pass
(0.1-0.6 in fp32 on this config), while seekformer matches the forward pass to 2e-6.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import build_pair, machine

from seekformer.inference import generate

FULL_LATENT = dict(
    hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16,
    kv_lora_rank=512, q_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
    n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2, moe_intermediate_size=256,
    max_position_embeddings=8192,
)
PREFILL_CHUNK = 512


class _Clock:
    """A transformers streamer that only records when each `put` happens (prompt, then each token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_transformers(model, ids: torch.Tensor, new: int, check: list[list[int]]) -> tuple[float, str, int]:
    """Decode tokens/s and cache bytes per token of transformers' generate, and how many of the greedy
    tokens in `check` (seekformer's) are transformers' own argmax given the tokens before them."""
    from transformers import DynamicCache

    B, P = ids.shape
    cache = DynamicCache(config=model.config)
    for start in range(0, P - 1, PREFILL_CHUNK):
        model(ids[:, start:min(start + PREFILL_CHUNK, P - 1)], past_key_values=cache, use_cache=True)
    teacher = copy.deepcopy(cache)
    clock = _Clock()
    model.generate(ids, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                   eos_token_id=None, pad_token_id=0, streamer=clock)
    seconds = clock.times[-1] - clock.times[1]
    cached = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    per_token = cached // (B * cache.get_seq_length())
    theirs = torch.tensor(check, device=ids.device)
    forced = torch.cat((ids[:, -1:], theirs[:, :-1]), dim=1)
    argmax = model(forced, past_key_values=teacher, use_cache=True).logits.argmax(-1)
    return (new - 1) * B / seconds, f"{int((argmax == theirs).sum())}/{theirs.numel()}", per_token


def run_seekformer(model, ids: torch.Tensor, new: int, path: str = "auto") -> tuple[float, list[list[int]], int]:
    out = generate(model, ids, max_new_tokens=new, stop_tokens=[], prefill_chunk=PREFILL_CHUNK, attention_path=path)
    return out.stats.decode_tokens_per_s, out.tokens, out.stats.cache_bytes_per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="128,1024,4096")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--naive", action="store_true", help="also time seekformer with the naive MLA path")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per setting; the best counts")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's; 1 is steadier when other processes share the CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both models run there)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    reference, ours = build_pair(dtype, **FULL_LATENT)
    with torch.no_grad():  # a peaked output head: fewer bf16 near-ties between the two greedy paths
        reference.lm_head.weight.mul_(30)
        ours.lm_head.weight.mul_(30)
    reference, ours = reference.to(args.device), ours.to(args.device)
    c = ours.config
    print(f"# decode, V3-style: hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} heads, "
          f"kv_lora_rank {c.kv_lora_rank}, rope {c.qk_rope_head_dim}, nope {c.qk_nope_head_dim}, v {c.v_head_dim}, "
          f"{c.n_routed_experts} experts top-{c.num_experts_per_tok}; {args.dtype} weights and cache; "
          f"greedy, {args.new_tokens} new tokens; {machine(args.device)}")
    naive_col = " seekformer naive tok/s |" if args.naive else ""
    print(f"| prompt | batch | transformers tok/s | seekformer tok/s |{naive_col} speed-up | "
          "cache B/token (tf / sf) | argmax agree |")
    print("|---|---|---|---|" + ("---|" if args.naive else "") + "---|---|---|")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        run_seekformer(ours, torch.randint(0, c.vocab_size, (1, 16), generator=gen).to(args.device), 4)  # warm-up
        for length in (int(x) for x in args.lengths.split(",")):
            for batch in (int(x) for x in args.batches.split(",")):
                ids = torch.randint(0, c.vocab_size, (batch, length), generator=gen).to(args.device)
                tf_rate = sf_rate = naive_rate = 0.0
                for _ in range(args.repeats):  # interleaved; the best rate of each counts
                    rate, sf_tokens, sf_bytes = run_seekformer(ours, ids, args.new_tokens)
                    sf_rate = max(sf_rate, rate)
                    rate, agreement, tf_bytes = run_transformers(reference, ids, args.new_tokens, sf_tokens)
                    tf_rate = max(tf_rate, rate)
                    if args.naive:
                        naive_rate = max(naive_rate, run_seekformer(ours, ids, args.new_tokens, "naive")[0])
                naive = f" {naive_rate:.1f} |" if args.naive else ""
                print(f"| {length} | {batch} | {tf_rate:.1f} | {sf_rate:.1f} |{naive} {sf_rate / tf_rate:.2f}x | "
                      f"{tf_bytes:,} / {sf_bytes:,} | {agreement} |", flush=True)


if __name__ == "__main__":
    main()
