"""AdamW with bf16 moments (`optim.moment_dtype=bf16`, DeepSeek-V3's recipe) against float32 moments on
the demo model: the same data, seed and steps.

    PYTHONPATH=src python benchmarks/adamw_moments.py --steps 120 --runs /tmp/moment_runs

Trains the `demo` run preset (tiny-v3, bf16 autocast) twice, with float32 and with bf16 AdamW moments,
at a fixed number of steps (no time fitting: both see the same batches and schedule), and prints the
loss gap at the end, the optimizer-state bytes of both, and the time of one optimizer step of each,
interleaved in this process (a ratio, not an absolute speed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from seekformer.training.adamw_moments import optimizer_state_bytes
from seekformer.training.metrics import read_metrics
from seekformer.training.pretrain import Trainer
from seekformer.training.run_config import MOMENT_DTYPES, RunConfig


def _config(moments: str, steps: int, threads: int, seed: int, run_dtype: str) -> RunConfig:
    cfg = RunConfig.preset("demo")
    cfg.apply_overrides([f"run.seed={seed}", f"run.dtype={run_dtype}", f"optim.moment_dtype={moments}",
                         f"run.steps={steps}", "run.fit_to_time=false", "run.max_minutes=0",
                         f"run.eval_every={max(steps // 4, 1)}", "run.save_every=0", f"run.threads={threads}",
                         "run.log_every=5"])
    return cfg


def _step_seconds(trainers: dict[str, Trainer], repeats: int) -> dict[str, float]:
    """Median time of `optimizer.step()` for each trainer, interleaved (same gradients, lr 0: no change)."""
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for trainer in trainers.values():
        x, y = next(trainer.sampler)
        trainer.losses(x, y, 1.0, with_mtp=True)["total"].backward()
        for group in trainer.optimizer.param_groups:
            group["lr"] = 0.0
    for _ in range(repeats):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.optimizer.step()
            times[name].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def _control(args: argparse.Namespace) -> int:
    import torch

    from seekformer.training import pretrain
    from seekformer.training.adamw_moments import AdamWLowPrecisionMoments
    from seekformer.training.optim import engram_tables, param_groups

    def float32_moments(model, cfg):
        groups = param_groups(model, cfg.weight_decay, exclude=engram_tables(model))
        return AdamWLowPrecisionMoments(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                        moment_dtype=torch.float32)

    pretrain.build_optimizer = float32_moments
    run_dir = args.runs / f"{args.dtype}-moments_fp32_unfused-seed{args.seed}"
    if not (run_dir / "final").is_dir():
        Trainer(_config("fp32", args.steps, args.threads, args.seed, args.dtype), run_dir, progress=False).train()
    records = read_metrics(run_dir)
    train = [r["loss"] for r in records if r["kind"] == "train"]
    last = min(10, len(train))
    mean = sum(train[-last:]) / last
    print(f"control (float32 moments, unfused): train loss, mean of the last {last * 5} steps {mean:.4f}")
    for r in records:
        if r["kind"] == "val":
            print(f"control val loss @{r['step']}: {r['val_loss']:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bf16", help="run.dtype of both runs (bf16 or fp8)")
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--only", choices=MOMENT_DTYPES, help="train this run only (run the two in parallel)")
    parser.add_argument("--control", action="store_true",
                        help="train a third run only: the bf16-moment optimizer with float32 moments, the same "
                             "arithmetic as torch's fused AdamW up to float32 rounding order; how far it ends from "
                             "the fused run is the trajectory change of a perturbation that loses no precision")
    args = parser.parse_args(argv)
    if args.control:
        return _control(args)
    trainers: dict[str, Trainer] = {}
    scratch = tempfile.TemporaryDirectory()
    results: dict[str, dict] = {}
    for moments in (args.only,) if args.only else MOMENT_DTYPES:
        run_dir = args.runs / f"{args.dtype}-moments_{moments}-seed{args.seed}"
        cfg = _config(moments, args.steps, args.threads, args.seed, args.dtype)
        if not (run_dir / "final").is_dir():
            trainer = Trainer(cfg, run_dir, progress=False)
            trainer.train()
            (run_dir / "optimizer_state_bytes.json").write_text(json.dumps(optimizer_state_bytes(trainer.optimizer)))
        records = read_metrics(run_dir)
        results[moments] = {"train": [r["loss"] for r in records if r["kind"] == "train"],
                            "val": [(r["step"], r["val_loss"]) for r in records if r["kind"] == "val"],
                            "state": json.loads((run_dir / "optimizer_state_bytes.json").read_text())}
        if not args.only:  # a fresh trainer of each kind for the step timing
            trainers[moments] = Trainer(cfg, Path(scratch.name) / moments, progress=False)
    if args.only:
        return 0
    fp32, bf16 = results["fp32"], results["bf16"]
    last = min(10, len(fp32["train"]))
    end = {k: sum(r["train"][-last:]) / last for k, r in results.items()}
    print(f"train loss, mean of the last {last * 5} steps: fp32 moments {end['fp32']:.4f}, bf16 moments "
          f"{end['bf16']:.4f}, relative gap {(end['bf16'] - end['fp32']) / end['fp32']:+.3%}")
    for (step, vf), (_, vb) in zip(fp32["val"], bf16["val"]):
        print(f"val loss @{step}: fp32 moments {vf:.4f}, bf16 moments {vb:.4f}, relative gap {(vb - vf) / vf:+.3%}")
    print(f"optimizer state: fp32 moments {fp32['state'] / 1e6:.2f} MB, bf16 moments {bf16['state'] / 1e6:.2f} MB "
          f"({bf16['state'] / fp32['state']:.3f}x)")
    seconds = _step_seconds(trainers, repeats=20)
    print(f"optimizer step (median of 20, interleaved): fp32 fused AdamW {seconds['fp32'] * 1e3:.1f} ms, bf16 moments "
          f"{seconds['bf16'] * 1e3:.1f} ms ({seconds['bf16'] / seconds['fp32']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
