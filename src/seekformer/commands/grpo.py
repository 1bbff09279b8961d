"""`seekformer grpo`: reinforcement learning with GRPO and rule-based rewards from a model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "GRPO (DeepSeek-R1's RL) on a generated task (arithmetic, countdown) or a JSONL of prompts and answers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", type=Path, metavar="DIR", help="run directory to create")
    what.add_argument("--resume", type=Path, metavar="DIR", help="continue the GRPO run in DIR")
    parser.add_argument("--model", type=Path, metavar="DIR", help="the policy's starting weights (with its tokenizer)")
    parser.add_argument("--task", choices=("arithmetic", "countdown"), help="a generated task")
    parser.add_argument("--data", type=Path, metavar="JSONL", help='{"prompt", "answer"} per line')
    parser.add_argument("--config", type=Path, metavar="TOML", help="a GRPO config ([grpo] [task] [rewards] ...)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="override a setting, e.g. --set grpo.group_size=16 --set rewards.format=0.5")
    parser.add_argument("--no-progress", action="store_true", help="print log lines instead of a progress bar")
    parser.add_argument("--no-plots", action="store_true", help="do not draw plots at the end")


def run(args: argparse.Namespace) -> int:
    from seekformer.commands.train import distributed_run
    from seekformer.training.grpo import GRPOConfig, GRPOTrainer
    from seekformer.training.grpo_plots import plot_grpo_run

    progress = False if args.no_progress else None
    if distributed_run(args.resume):  # under torchrun, or resuming a run it saved: data parallel
        from seekformer.distributed.post_training import DistributedGRPOTrainer as GRPOTrainer
    if args.resume is not None:
        if args.config or args.model or args.task or args.data:
            raise ValueError("--resume uses the run's saved config: drop --config, --model, --task and --data")
        trainer = GRPOTrainer.resume(args.resume, args.overrides, progress=progress)
    else:
        if args.task and args.data:
            raise ValueError("give --task or --data, not both")
        cfg = GRPOConfig.load(args.config) if args.config else GRPOConfig()
        if args.model:
            cfg.set("grpo.model", str(args.model))
        if args.task:
            cfg.set("task.name", args.task)
        if args.data:
            cfg.set("task.data", str(args.data))
        cfg.apply_overrides(args.overrides)
        trainer = GRPOTrainer(cfg, args.out, progress=progress)
    result = trainer.train()
    if not trainer.is_main:  # rank 0 reports and draws
        return 0
    before, after = result.eval_before.get("eval_accuracy"), result.eval_after.get("eval_accuracy")
    print(f"GRPO {result.run_dir}: step {result.step}" + (" (stopped by the time limit)" if result.stopped_by_time
                                                           else ""))
    if before is not None and after is not None:
        print(f"  held-out accuracy  {before:.3f} -> {after:.3f}")
    print(f"  model       {result.final_dir}  (hub layout with tokenizer.json)")
    print(f"  checkpoint  {result.checkpoint}")
    print(f"  metrics     {result.run_dir / 'metrics.jsonl'}")
    if not args.no_plots:
        print(f"  plots       {', '.join(str(p) for p in plot_grpo_run(result.run_dir))}")
    return 0
