"""V3's FP8 training recipe against bf16 on the demo model: the same data, seed and steps.

    PYTHONPATH=src python benchmarks/fp8_training.py --steps 300 --runs /tmp/fp8_runs

Trains the `demo` run preset (tiny-v3) twice, with `run.dtype=bf16` and `run.dtype=fp8`, with a
fixed number of steps (no time fitting, so both see the same batches and schedule), overlays the
loss curves in docs/img/fp8_vs_bf16.png and prints the relative loss gap at the end, the bytes per
parameter of the training state and the bytes autograd saves per token for the backward.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from seekformer.quant.fp8_training import saved_activation_bytes
from seekformer.training.metrics import read_metrics
from seekformer.training.pretrain import Trainer
from seekformer.training.run_config import RunConfig

DTYPES = ("bf16", "fp8")


def _config(dtype: str, steps: int, threads: int, seed: int) -> RunConfig:
    cfg = RunConfig.preset("demo")
    cfg.apply_overrides([f"run.seed={seed}", f"run.dtype={dtype}", f"run.steps={steps}", "run.fit_to_time=false",
                         "run.max_minutes=0",
                         f"run.eval_every={max(steps // 4, 1)}", "run.save_every=0", f"run.threads={threads}",
                         "run.log_every=5"])
    return cfg


def _saved_bytes_per_token(trainer: Trainer) -> tuple[float, float]:
    """Bytes autograd holds for the backward of one micro-batch, and elements it holds in FP8, per token."""
    x, y = next(trainer.sampler)

    def step():
        trainer.losses(x, y, 1.0, with_mtp=True)[0]["total"].backward()

    total, fp8_elements = saved_activation_bytes(step, trainer.model.parameters())
    trainer.model.zero_grad(set_to_none=True)
    return total / x.numel(), fp8_elements / x.numel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed")
    parser.add_argument("--runs", type=Path, required=True, help="directory for the two runs")
    parser.add_argument("--plot", type=Path, default=Path("docs/img/fp8_vs_bf16.png"))
    parser.add_argument("--only", choices=DTYPES, help="train this run only (run the two in parallel), no report")
    args = parser.parse_args(argv)
    results: dict[str, dict] = {}
    for dtype in (args.only,) if args.only else DTYPES:
        run_dir = args.runs / f"{dtype}-seed{args.seed}"
        if not (run_dir / "final").is_dir():
            trainer = Trainer(_config(dtype, args.steps, args.threads, args.seed), run_dir, progress=False)
            trainer.train()
            saved = _saved_bytes_per_token(trainer)  # after training: the probe must not shift the batches
            (run_dir / "saved_bytes_per_token.json").write_text(json.dumps({"saved_bytes_per_token": saved[0],
                                                                               "fp8_elements_per_token": saved[1]}))
        records = read_metrics(run_dir)
        train = [(r["step"], r["loss"], r.get("tokens_per_s")) for r in records if r["kind"] == "train"]
        val = [(r["step"], r["val_loss"]) for r in records if r["kind"] == "val"]
        saved = json.loads((run_dir / "saved_bytes_per_token.json").read_text())
        results[dtype] = {"train": train, "val": val, "saved": saved["saved_bytes_per_token"],
                          "fp8_elements": saved["fp8_elements_per_token"]}
    if args.only:
        return 0
    _plot(results, args.plot)
    bf16, fp8 = results["bf16"], results["fp8"]
    last = min(10, len(bf16["train"]))  # the mean of the last 10 logged intervals (50 steps) smooths batch noise
    end = {d: sum(loss for _, loss, _ in r["train"][-last:]) / last for d, r in results.items()}
    print(f"train loss, mean of the last {last * 5} steps: bf16 {end['bf16']:.4f}, fp8 {end['fp8']:.4f}, "
          f"relative gap {(end['fp8'] - end['bf16']) / end['bf16']:+.3%}")
    vb, vf = bf16["val"][-1][1], fp8["val"][-1][1]
    print(f"final val loss: bf16 {vb:.4f}, fp8 {vf:.4f}, relative gap {(vf - vb) / vb:+.3%}")
    speed = {d: sorted(s for _, _, s in r["train"] if s)[len(r["train"]) // 2] for d, r in results.items()}
    print(f"median tokens/s: bf16 {speed['bf16']:.0f}, fp8 (CPU emulation) {speed['fp8']:.0f}")
    print(f"saved for the backward per token: bf16 {bf16['saved'] / 1e3:.1f} kB, fp8 {fp8['saved'] / 1e3:.1f} kB "
          f"({fp8['saved'] / bf16['saved']:.2f}x)")
    n = fp8["fp8_elements"]
    print(f"linear-layer inputs saved in FP8 per token: {n:.0f} elements = {n * (1 + 4 / 128) / 1e3:.1f} kB "
          f"(1 B + a float32 scale per 128) instead of {2 * n / 1e3:.1f} kB in bf16")
    print(f"plot: {args.plot}")
    return 0


def _plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for dtype, colour in zip(DTYPES, ("tab:blue", "tab:red")):
        steps, losses = [s for s, _, _ in results[dtype]["train"]], [x for _, x, _ in results[dtype]["train"]]
        ax.plot(steps, losses, color=colour, lw=1, label=f"{dtype} train")
        vs, vl = zip(*results[dtype]["val"])
        ax.plot(vs, vl, "o--", color=colour, label=f"{dtype} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("tiny-v3 demo model: bf16 vs FP8 recipe (CPU emulation), same data and seed", fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
