"""Training throughput: seekformer vs transformers' DeepseekV3ForCausalLM, same config, batch and weights.

    python benchmarks/train_step.py [--batch 4 --seq 512 --repeats 3 --threads 1]
    python benchmarks/train_step.py --device cuda --config gpu --batch 4 --seq 2048 --modes bf16,fp8

One step = forward, next-token cross-entropy, backward, AdamW update (fp32 weights and optimizer
states). "fp32" computes in float32; "bf16" under bf16 autocast (the training fast path); "fp8" runs
seekformer with V3's FP8 recipe (`convert_to_fp8_training`, under bf16 autocast) against transformers
in bf16 (it has no FP8 training). `--config gpu` is a larger V3-style model for a GPU. Prints
tokens/s, the ratio seekformer / transformers, and MFU against a matmul peak measured in the same
run. Both models compute the main loss only (transformers has no MTP training or balance losses).

By default each library computes the loss its own way, as its users train: transformers through
`labels=` (its `ForCausalLMLoss` over float32 logits), seekformer through the trainer's chunked
`linear_cross_entropy`. `--loss common` gives both the same `F.cross_entropy` over full logits.

The ratio is given twice: from wall-clock time and from this process's CPU time. On a loaded
machine with `--threads 1` the CPU time leaves out the time the process waited for a core, so its
ratio is the steadier of the two. `--experts autograd_loop` runs seekformer's routed experts as the
same per-expert loop left to autograd (the implementation before the hand-written backward), for a
before/after comparison in one command.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F
from common import V3_STYLE, build_pair, machine

from seekformer.model.stats import count_parameters, flops_per_token
from seekformer.quant.fp8_training import convert_to_fp8_training
from seekformer.training.cross_entropy import linear_cross_entropy
from seekformer.training.machine import measure_matmul_peak

GPU_STYLE = dict(  # V3-shaped and large enough that a GPU step is not bound by kernel launches
    V3_STYLE, vocab_size=32000, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=768,
    num_hidden_layers=3, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=32, num_experts_per_tok=4,
    n_group=4, topk_group=2, kv_lora_rank=512, q_lora_rank=768, qk_rope_head_dim=64, qk_nope_head_dim=128,
    v_head_dim=128, max_position_embeddings=4096,
)
CONFIGS = {"v3-style": V3_STYLE, "gpu": GPU_STYLE}


def step_fn(model, ids: torch.Tensor, autocast: bool, ours: bool, own_loss: bool = True):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def loss_of() -> torch.Tensor:
        if own_loss and ours:
            return linear_cross_entropy(model.hidden_states(inputs), model.lm_head.weight, targets)
        if own_loss:
            return model(input_ids=inputs, labels=targets, shift_labels=targets).loss
        logits = model(inputs) if ours else model(input_ids=inputs).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def step() -> float:
        ctx = torch.autocast(ids.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def time_pair(ref_step, our_step, repeats: int):
    """Median (wall, process CPU) seconds per step of each and the median of the per-pair wall-time
    ratios, alternating the two so that a change in the machine's load hits both alike; plus the
    loss of each one's first (warm-up) step, taken from the same weights."""
    first_ref, first_ours = ref_step(), our_step()
    ref: list[tuple[float, float]] = []
    ours: list[tuple[float, float]] = []
    for _ in range(repeats):
        for step, times in ((ref_step, ref), (our_step, ours)):
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            times.append((time.perf_counter() - wall, time.process_time() - cpu))

    def medians(times):
        return statistics.median(t for t, _ in times), statistics.median(c for _, c in times)

    pair_ratio = statistics.median(r[0] / o[0] for r, o in zip(ref, ours))
    return medians(ref), medians(ours), pair_ratio, first_ref, first_ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="fp32,bf16", help="fp32, bf16 (autocast) and/or fp8 (seekformer only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", default="v3-style", choices=tuple(CONFIGS))
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's default)")
    parser.add_argument("--experts", default="auto", choices=("auto", "loop", "autograd_loop", "grouped_mm"),
                        help="seekformer's routed-experts implementation (Experts.implementation)")
    parser.add_argument("--loss", default="own", choices=("own", "common"),
                        help="each library's own training loss, or one F.cross_entropy for both")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = CONFIGS[args.config]
    print(f"# training step, {args.config} config {config['hidden_size']} hidden, "
          f"{config['num_hidden_layers']} layers, "
          f"{config['n_routed_experts']} experts top-{config['num_experts_per_tok']}; "
          f"batch {args.batch} x {args.seq} tokens; seekformer experts: {args.experts}; loss: {args.loss}; "
          f"{machine(args.device)}")
    print("| compute | transformers tok/s | seekformer tok/s | ratio | median pair ratio | ratio (CPU time) "
          "| seekformer MFU | matmul peak GFLOP/s | first-step loss (theirs / ours) |")
    print("|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config["vocab_size"], (args.batch, args.seq + 1), generator=gen).to(args.device)
    tokens = args.batch * args.seq
    for mode in args.modes.split(","):
        autocast = mode in ("bf16", "fp8")
        reference, ours = build_pair(torch.float32, **{k: v for k, v in config.items() if V3_STYLE.get(k) != v})
        reference, ours = reference.to(args.device).train(), ours.to(args.device).train()
        if mode == "fp8":
            convert_to_fp8_training(ours)
        for module in ours.modules():
            if hasattr(module, "resolve_implementation"):
                module.implementation = args.experts
        flops = flops_per_token(ours.config, count_parameters(ours), args.seq)
        (t_ref, cpu_ref), (t_ours, cpu_ours), pair_ratio, loss_ref, loss_ours = time_pair(
            step_fn(reference, ids, autocast, False, args.loss == "own"),
            step_fn(ours, ids, autocast, True, args.loss == "own"), args.repeats)
        dtype = torch.bfloat16 if autocast else torch.float32
        size = 8192 if args.device.startswith("cuda") else 1024  # a GPU reaches its peak on large products only
        peak = max(measure_matmul_peak(torch.device(args.device), dtype, seconds=0.3, size=size) for _ in range(3))
        mfu = flops * tokens / t_ours / peak
        print(f"| {mode} | {tokens / t_ref:,.0f} | {tokens / t_ours:,.0f} | {t_ref / t_ours:.2f}x | {pair_ratio:.2f}x "
              f"| {cpu_ref / cpu_ours:.2f}x | {100 * mfu:.1f}% | {peak / 1e9:.0f} | {loss_ref:.4f} / {loss_ours:.4f} |")


if __name__ == "__main__":
    main()
