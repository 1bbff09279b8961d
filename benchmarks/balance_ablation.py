"""Load balancing and MTP ablation at small scale on the default corpus, equal tokens per arm.

    python benchmarks/balance_ablation.py [--steps 250] [--out runs/ablation] [--arms none,aux,free,...]

Arms (same model, seed, data order and schedule; only the balancing / MTP settings differ):
  none        no balancing: router bias frozen at 0, no auxiliary loss
  aux         V2-style expert-level auxiliary loss only (alpha = --aux-alpha)
  free        auxiliary-loss-free bias update (gamma 0.001, V3's) + tiny sequence-wise loss (alpha 1e-4)
  free-fast   as `free` with gamma 0.01 (the runs are short and the learning rate high)
  free-nomtp  as `free`, without the MTP module (D = 0): compares the main head's validation loss
Prints a table (final validation loss of the main head, MaxVio on the validation set and on the last
training batches) and draws docs/img/balance_ablation.png. Every arm is a normal run directory
(metrics.jsonl, plots) under --out.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from seekformer.training.metrics import read_metrics
from seekformer.training.pretrain import Trainer
from seekformer.training.run_config import RunConfig

ARMS = {
    "none": ["balance.bias_update_speed=0", "balance.seq_aux_alpha=0", "balance.aux_loss_alpha=0"],
    "aux": ["balance.bias_update_speed=0", "balance.seq_aux_alpha=0", "balance.aux_loss_alpha={aux_alpha}"],
    "free": ["balance.bias_update_speed=0.001", "balance.seq_aux_alpha=0.0001", "balance.aux_loss_alpha=0"],
    "free-fast": ["balance.bias_update_speed=0.01", "balance.seq_aux_alpha=0.0001", "balance.aux_loss_alpha=0"],
    "free-nomtp": ["balance.bias_update_speed=0.001", "balance.seq_aux_alpha=0.0001", "balance.aux_loss_alpha=0",
                   "mtp.depth=0"],
}


def run_arm(name: str, args: argparse.Namespace) -> dict:
    cfg = RunConfig.preset(args.preset)
    cfg.apply_overrides([f"run.steps={args.steps}", f"run.eval_every={max(1, args.steps // 6)}", "run.save_every=0",
                         f"run.log_every={max(1, args.steps // 60)}", f"data.eval_batches={args.eval_batches}",
                         *(s.format(aux_alpha=args.aux_alpha) for s in ARMS[name]), *args.set])
    run_dir = args.out / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    start = time.perf_counter()
    result = Trainer(cfg, run_dir, progress=not args.no_progress).train()
    minutes = (time.perf_counter() - start) / 60
    train = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    tail = train[-max(1, len(train) // 10):]  # last tenth of the run
    return {
        "arm": name, "tokens": result.tokens, "minutes": minutes,
        "val_loss": result.val["val_loss"], "val_maxvio": result.val.get("val_maxvio_mean", float("nan")),
        "train_maxvio": sum(r["maxvio_mean"] for r in tail) / len(tail),
        "train_loss": sum(r["loss"] for r in tail) / len(tail),
    }


def draw(args: argparse.Namespace, arms: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_vio) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, name in enumerate(arms):
        records = read_metrics(args.out / name)
        val = [r for r in records if r["kind"] == "val"]
        train = [r for r in records if r["kind"] == "train"]
        ax_loss.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", color=f"C{i}", label=name)
        ax_vio.plot([r["tokens"] for r in train], [r["maxvio_mean"] for r in train], color=f"C{i}", label=name)
    ax_loss.set(xlabel="tokens", ylabel="validation loss (main head)", title="validation loss")
    ax_vio.set(xlabel="tokens", ylabel="MaxVio (training batches, mean over MoE layers)", title="load imbalance")
    ax_vio.set_yscale("log")
    for ax in (ax_loss, ax_vio):
        ax.grid(alpha=0.3)
        ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", help="run preset of the model and data (default demo)")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--aux-alpha", type=float, default=0.01, help="alpha of the auxiliary-loss arm")
    parser.add_argument("--eval-batches", type=int, default=40)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--set", action="append", default=[], help="extra section.key=value for every arm")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--plot", type=Path, default=Path("docs/img/balance_ablation.png"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    rows = [run_arm(name, args) for name in arms]
    print(f"\n# {args.steps} steps per arm, preset {args.preset}, aux alpha {args.aux_alpha}, settings {args.set}")
    print("| arm | tokens | val loss (main head) | val MaxVio | train MaxVio (last 10%) | train loss (last 10%) "
          "| minutes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {r['tokens']:,} | {r['val_loss']:.4f} | {r['val_maxvio']:.3f} | {r['train_maxvio']:.3f} "
              f"| {r['train_loss']:.4f} | {r['minutes']:.1f} |")
    draw(args, arms, args.plot)


if __name__ == "__main__":
    main()
