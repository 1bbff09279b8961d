"""`seekformer demo --r1`: the R1 recipe in miniature, on CPU.

A tiny DeepSeek-V3-style model (MLA, shared + routed experts, sigmoid group-limited routing with
the aux-loss-free bias) and a byte-level tokenizer are built for the arithmetic task; a short SFT
warm-up on worked solutions (`<think>` column sums `</think><answer>` result `</answer>`) teaches the
format; GRPO then trains on the task's rewards. The held-out accuracy (greedy) is measured before
and after GRPO and logged as `eval_accuracy` in the GRPO run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from seekformer.training.sft import SFTResult
    from seekformer.training.tasks import Task

# the demo's task: two-operand addition up to 2 digits, held-out 200 problems
TASK_OPTIONS = {"min_digits": 1, "max_digits": 2, "ops": "+", "curriculum": False}
ANSWER_TAGS = ("<answer>", "</answer>")
SFT_STEPS, SFT_BATCH, SFT_LR = 300, 32, 3e-3  # the warm-up: about 55% held-out accuracy
SFT_MAX_SHARE = 0.5  # of the time budget, at most (a slow machine stops the warm-up early)
EVAL_RESERVE_MINUTES = 0.1  # the held-out evaluation after GRPO
GRPO_SETTINGS = {  # see docs/post-training.md for how they were chosen
    "grpo.prompts_per_step": 16, "grpo.group_size": 8, "grpo.max_new_tokens": 24, "grpo.eval_batch": 200,
    "optim.lr": 5e-4, "run.steps": 100_000, "run.save_every": 50, "grpo.eval_every": 50,
}
MODEL = dict(  # tiny-v3 shapes, 2 layers (the first dense), no MTP
    hidden_size=128, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
    topk_group=1, kv_lora_rank=32, q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
    first_k_dense_replace=1, max_position_embeddings=128, num_nextn_predict_layers=0,
)


def build_policy(out: Path, task: Task, seed: int = 0, **model_overrides) -> Path:
    """A randomly initialised tiny V3-style model and a tokenizer trained on the task's texts,
    saved as a hub-layout model directory."""
    import torch

    from seekformer.config import PRESETS, ModelConfig
    from seekformer.model.transformer import Transformer
    from seekformer.tokenizer import SPECIAL_TOKENS, train_tokenizer
    from seekformer.training.checkpointing import write_model_dir

    rng = random.Random(seed)
    texts = []
    for example in task.train_batch(rng, 2000):
        texts += [example.prompt, example.solution]
    tokenizer = train_tokenizer(texts, vocab_size=300, special_tokens=(*SPECIAL_TOKENS, *ANSWER_TAGS))
    fields = {**PRESETS["tiny-v3"], **MODEL, **model_overrides, "vocab_size": tokenizer.vocab_size,
              "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(fields))
    model.init_weights()
    write_model_dir(model, tokenizer, out)
    return out


def sft_warmup(model_dir: Path, task: Task, out: Path, steps: int = SFT_STEPS, seed: int = 0,
               max_minutes: float = 0.0, progress: bool | None = False) -> SFTResult:
    """Supervised fine-tuning (`seekformer.training.sft`) on the task's worked solutions, written as
    `{"prompt", "completion"}` records: `steps` steps of 32 examples (loss on the completion only)."""
    import json

    from seekformer.io_utils import atomic_write_text
    from seekformer.training.sft import sft

    rng = random.Random(f"sft-{seed}")
    records = [{"prompt": e.prompt, "completion": e.solution} for e in task.train_batch(rng, steps * SFT_BATCH)]
    data = out.with_name(out.name + ".jsonl")
    atomic_write_text(data, "".join(json.dumps(r) + "\n" for r in records))
    settings = [f"run.steps={steps}", f"data.batch_size={SFT_BATCH}", "data.val_fraction=0", f"run.seed={seed}",
                f"optim.lr={SFT_LR}", "schedule.kind='constant'", "schedule.warmup_steps=0",
                "run.eval_every=0", "run.save_every=0", f"run.log_every={max(1, steps // 10)}",
                f"run.max_minutes={max_minutes}"]
    return sft(model_dir, data, out, overrides=settings, progress=progress)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--r1", action="store_true",
                        help="instead: the R1 recipe on arithmetic (tiny model -> SFT warm-up -> GRPO), "
                        "held-out accuracy before and after")


def run(args: argparse.Namespace) -> int:
    if args.minutes <= 0:
        raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    out = args.out or Path("runs") / time.strftime("demo-r1-%Y%m%d-%H%M%S")
    run_r1(out, args.minutes, args.seed, args.overrides, sft_max_minutes=SFT_MAX_SHARE * args.minutes,
           progress=False if args.no_progress else None)
    return 0


def run_r1(out: Path, minutes: float, seed: int = 0, overrides: list[str] = (), sft_steps: int = SFT_STEPS,
           sft_max_minutes: float = 0.0, progress: bool | None = None):
    """Tiny model -> SFT warm-up (`sft_steps`, stopped after `sft_max_minutes` if > 0) -> GRPO until
    `minutes` have passed in all; `overrides` set GRPO settings. Returns the GRPO run's result."""
    from seekformer.training.grpo import GRPOConfig, GRPOTrainer
    from seekformer.training.grpo_plots import plot_grpo_run
    from seekformer.training.tasks import ArithmeticTask

    started = time.perf_counter()
    if (out / "rl").exists():
        raise ValueError(f"{out} already holds a demo run; choose another --out")
    task = ArithmeticTask(seed=seed, **TASK_OPTIONS)
    build_policy(out / "init", task, seed)
    print(f"task     two-operand addition up to {TASK_OPTIONS['max_digits']} digits; "
          f"{len(task.eval_set())} held-out problems")
    print(f"sft      warm-up: {sft_steps} steps of {SFT_BATCH} worked solutions ...")
    warm = sft_warmup(out / "init", task, out / "sft", sft_steps, seed, sft_max_minutes, progress=progress)
    print(f"sft      {warm.step} steps in {time.perf_counter() - started:.0f} s -> {warm.final_dir}")

    cfg = GRPOConfig()
    cfg.set("grpo.model", str(warm.final_dir))
    for key, value in GRPO_SETTINGS.items():
        cfg.set(key, value)
    cfg.task.options = dict(TASK_OPTIONS)
    cfg.set("run.seed", seed)
    cfg.set("run.max_minutes", max(minutes - (time.perf_counter() - started) / 60 - EVAL_RESERVE_MINUTES, 0.05))
    cfg.apply_overrides(list(overrides))
    result = GRPOTrainer(cfg, out / "rl", progress=progress).train()
    plots = plot_grpo_run(result.run_dir)
    before, after = result.eval_before["eval_accuracy"], result.eval_after["eval_accuracy"]
    print(f"\nheld-out accuracy (greedy, {len(task.eval_set())} problems): before GRPO {before:.3f}, "
          f"after {result.step} GRPO steps {after:.3f} ({100 * (after - before):+.1f} points)")
    print(f"  model       {result.final_dir}\n  metrics     {result.run_dir / 'metrics.jsonl'}")
    print(f"  plots       {', '.join(str(p) for p in plots)}")
    print(f"total time {time.perf_counter() - started:.0f} s")
    return result
