"""`seekformer distill`: a teacher model writes completions for a prompt file (R1-style distillation data)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "generate teacher completions for a prompt file (batched, resumable, optionally reward-filtered) for SFT"

DTYPES = ("fp32", "bf16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, metavar="DIR", help="teacher model directory (with its tokenizer)")
    parser.add_argument("--prompts", required=True, type=Path, metavar="FILE",
                        help='JSONL of {"prompt": ...} or {"messages": [...]} records, optionally with "answer"')
    parser.add_argument("--out", required=True, type=Path, metavar="FILE",
                        help="traces JSONL (appended; a rerun with the same settings resumes it)")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the teacher's)")
    parser.add_argument("--samples", type=int, default=1, help="completions per prompt (default 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--think", action="store_true", help="open the assistant turn with <think> (DeepSeek-R1)")
    parser.add_argument("--reward", metavar="MODULE:FUNCTION",
                        help="keep only completions this reward scores >= --min-reward (rejection sampling); a "
                        "name alone is looked up in seekformer.training.rewards")
    parser.add_argument("--min-reward", type=float, default=1.0, help="acceptance threshold (default 1)")
    parser.add_argument("--keep-truncated", action="store_true",
                        help="keep completions cut by --max-new-tokens (dropped by default)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from seekformer.training.distill import generate_traces

    stats = generate_traces(
        args.teacher, args.prompts, args.out, samples=args.samples, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        think=args.think, reward=args.reward, min_reward=args.min_reward, keep_truncated=args.keep_truncated,
        tokenizer=args.tokenizer, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype],
        device=args.device, progress=False if args.no_progress else None)
    print(f"{args.out}: {stats.accepted} of {stats.generated} new completions kept "
          f"({stats.prompts} prompts, {stats.batches} batches, {stats.skipped_batches} done before)")
    print(f"  train a student on them:  seekformer sft --model STUDENT_DIR --data {args.out} --out RUN_DIR")
    return 0
