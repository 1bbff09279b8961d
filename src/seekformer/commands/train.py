"""`seekformer train`: pretrain a model from a run config (TOML file or preset), or resume a run."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HELP = "pretrain a DeepSeek-style model (MTP, auxiliary-loss-free balancing) from a run config, or resume a run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from seekformer.config import PRESETS
    from seekformer.training.run_config import RUN_PRESETS

    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", type=Path, metavar="DIR", help="run directory to create")
    what.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    parser.add_argument("--config", metavar="TOML_OR_PRESET",
                        help="run config: a .toml file (or a run's run_config.json), a run preset "
                        f"({', '.join(RUN_PRESETS)}) or a model preset trained with the default settings "
                        f"({', '.join(PRESETS)}); default: the default settings with model preset tiny-v3")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="override a setting, e.g. --set optim.lr=1e-3 --set model.hidden_size=256 (repeatable; "
                        "on --resume only run.* settings)")
    parser.add_argument("--no-progress", action="store_true", help="print log lines instead of a progress bar")
    parser.add_argument("--no-plots", action="store_true", help="do not draw plots at the end")


def run(args: argparse.Namespace) -> int:
    from seekformer.training.plots import plot_run
    from seekformer.training.pretrain import Trainer
    from seekformer.training.run_config import RunConfig

    progress = False if args.no_progress else None
    trainer_class = Trainer
    if distributed_run(args.resume):
        from seekformer.distributed.trainer import DistributedTrainer as trainer_class
    if args.resume is not None:
        if args.config:
            raise ValueError("--config cannot be combined with --resume (the run's saved config is used)")
        trainer = trainer_class.resume(args.resume, args.overrides, progress=progress)
    else:
        cfg = RunConfig() if args.config is None else RunConfig.from_spec(args.config)
        cfg.apply_overrides(args.overrides)
        trainer = trainer_class(cfg, args.out, progress=progress)
    result = trainer.train()
    if not trainer.is_main:  # rank 0 reports and draws
        return 0
    print(summary(result))
    if not args.no_plots:
        plots = plot_run(result.run_dir)
        print(f"  plots       {', '.join(str(p) for p in plots)}")
    return 0


def distributed_run(resume: Path | None) -> bool:
    """Launched by torchrun (its WORLD_SIZE variable), or resuming a run saved by one (distributed
    checkpoints): use the distributed trainer, which is the same loop over a process group."""
    if "WORLD_SIZE" in os.environ:
        return True
    if resume is None:
        return False
    from seekformer.distributed.checkpoint import is_distributed_checkpoint
    from seekformer.training.checkpointing import CHECKPOINTS, LATEST

    pointer = resume / CHECKPOINTS / LATEST
    return pointer.is_file() and is_distributed_checkpoint(resume / CHECKPOINTS / pointer.read_text().strip())


def summary(result) -> str:
    """A few lines: where the run stands, its last metrics, where its files are."""
    lines = [f"trained {result.run_dir}: step {result.step}, {result.tokens:,} tokens"
             + (" (stopped by the time limit)" if result.stopped_by_time else "")]
    if result.train:
        t = result.train
        lines.append(f"  train       loss {t['loss']:.4f}" + "".join(
            f", MTP-{k.rsplit('_', 1)[1]} {v:.4f}" for k, v in t.items() if k.startswith("mtp_loss_"))
            + (f", MaxVio {t['maxvio_mean']:.3f}" if "maxvio_mean" in t else "")
            + f", {t['tokens_per_s']:,.0f} tok/s, MFU {100 * t['mfu']:.1f}%")
    if result.val:
        v = result.val
        lines.append(f"  validation  loss {v['val_loss']:.4f} (perplexity {v['val_ppl']:.1f})" + "".join(
            f", MTP-{k.rsplit('_', 1)[1]} {x:.4f}" for k, x in v.items() if k.startswith("val_mtp_loss_"))
            + (f", MaxVio {v['val_maxvio_mean']:.3f}" if "val_maxvio_mean" in v else "")
            + "".join(f", Engram gate {k} {g:.3f}" for k, g in v.get("val_engram_gate", {}).items()))
    lines.append(f"  model       {result.final_dir}  (hub layout with tokenizer.json)")
    lines.append(f"  checkpoint  {result.checkpoint}")
    lines.append(f"  metrics     {result.run_dir / 'metrics.jsonl'}")
    return "\n".join(lines)
