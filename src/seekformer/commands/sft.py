"""`seekformer sft`: supervised fine-tuning (and logit distillation) of a model directory on chat data."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "fine-tune a model directory on chat JSONL (loss on assistant tokens), optionally distilling a teacher's logits"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", type=Path, metavar="DIR", help="run directory to create")
    what.add_argument("--resume", type=Path, metavar="DIR", help="continue the SFT run in DIR")
    parser.add_argument("--model", metavar="DIR", help="model directory to start from (seekformer's or transformers')")
    parser.add_argument("--data", metavar="FILE", help="training JSONL of {messages} or {prompt, completion} records")
    parser.add_argument("--val", metavar="FILE", help="validation JSONL (default: hold out data.val_fraction)")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the model directory)")
    parser.add_argument("--teacher", metavar="DIR", help="logit distillation: forward KL to this model's distribution "
                        "(same tokenizer)")
    parser.add_argument("--freeze", action="append", default=[], metavar="PATTERN",
                        help="freeze parameters by name pattern (fnmatch) or group: embeddings, head, router, "
                        "experts, attention, norms, mtp (repeatable)")
    parser.add_argument("--packing", action="store_true", help="pack several examples per sequence")
    parser.add_argument("--config", metavar="TOML", help="SFT config file (sections model, data, loss, optim, "
                        "schedule, balance, run); flags above override it")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="override a setting, e.g. --set optim.lr=3e-5 --set run.steps=500 (repeatable; on "
                        "--resume only run.* and parallel.* settings)")
    parser.add_argument("--no-progress", action="store_true", help="print log lines instead of a progress bar")
    parser.add_argument("--no-plots", action="store_true", help="do not draw plots at the end")


def run(args: argparse.Namespace) -> int:
    from seekformer.commands.train import distributed_run
    from seekformer.training.plots import plot_run
    from seekformer.training.sft import SFTConfig, SFTTrainer

    progress = False if args.no_progress else None
    if distributed_run(args.resume):  # under torchrun, or resuming a run it saved: data parallel
        from seekformer.distributed.post_training import DistributedSFTTrainer as SFTTrainer
    if args.resume is not None:
        given = [flag for flag, value in (("--config", args.config), ("--model", args.model), ("--data", args.data),
                                          ("--val", args.val), ("--tokenizer", args.tokenizer),
                                          ("--teacher", args.teacher), ("--freeze", args.freeze),
                                          ("--packing", args.packing)) if value]
        if given:
            raise ValueError(f"{', '.join(given)} cannot be combined with --resume (the run's saved config is used)")
        trainer = SFTTrainer.resume(args.resume, args.overrides, progress=progress)
    else:
        cfg = SFTConfig.load(args.config) if args.config else SFTConfig()
        for key, value in (("model.dir", args.model), ("data.train", args.data), ("data.val", args.val),
                           ("model.tokenizer", args.tokenizer), ("loss.teacher", args.teacher)):
            if value:
                cfg.set(key, value, "command line")
        if args.freeze:
            cfg.set("model.freeze", cfg.model.freeze + args.freeze, "--freeze")
        if args.packing:
            cfg.set("data.packing", True, "--packing")
        cfg.apply_overrides(args.overrides)
        trainer = SFTTrainer(cfg, args.out, progress=progress)
    result = trainer.train()
    if not trainer.is_main:  # rank 0 reports and draws
        return 0
    print(summary(result))
    if not args.no_plots:
        plots = plot_run(result.run_dir)
        print(f"  plots       {', '.join(str(p) for p in plots)}")
    return 0


def summary(result) -> str:
    lines = [f"fine-tuned {result.run_dir}: step {result.step}, {result.tokens:,} tokens"
             + (" (stopped by the time limit)" if result.stopped_by_time else "")]
    if result.train:
        t = result.train
        lines.append(f"  train       loss {t['loss']:.4f}" + (f", KL {t['kl']:.4f}" if "kl" in t else "")
                     + f", {t['tokens_per_s']:,.0f} tok/s")
    if result.val:
        v = result.val
        lines.append(f"  validation  loss {v['val_loss']:.4f} (perplexity {v['val_ppl']:.1f})"
                     + (f", KL {v['val_kl']:.4f}" if "val_kl" in v else ""))
    lines.append(f"  model       {result.final_dir}  (hub layout with tokenizer.json)")
    lines.append(f"  checkpoint  {result.checkpoint}")
    lines.append(f"  metrics     {result.run_dir / 'metrics.jsonl'}")
    return "\n".join(lines)
