"""GRPO update time on one fixed rollout: this checkout against the update code of a git revision.

    python benchmarks/grpo_update.py --against 8837ccf [--steps 8 --prompts 4 --group 8 --tokens 32]

seekformer's GRPOTrainer (the model and settings of `grpo.py`) samples one rollout, then trains on it
again and again, each step alternating between this checkout's code and the revision's versions of
the update's hot paths, patched in for that step: the routed experts' autograd function
(`model/expert_kernels.py: LoopedExperts`), `RMSNorm.forward` (`model/layers.py`), gradient clipping
(`training/optim.py: clip_grad_norm`) and the shared-prompt layout helper (`training/grpo_prefix.py:
_to_rows`). Nothing else differs, so the ratio is what those changes did to the update. Each
variant runs `--block` steps in a row and only the last is timed: timed right after the other
variant, the previous code's fresh allocations met the memory the current code keeps between steps
and ran slower than in a process of their own (1.16x instead of ~1.09x). Printed:
median update seconds (wall clock and this process's CPU time, the steadier of the two on a shared
machine) and the median over pairs of revision / checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine
from grpo import build_model_dir, seekformer_trainer

import seekformer.model.expert_kernels as expert_kernels
import seekformer.training.grpo_prefix as grpo_prefix
import seekformer.training.post_training_hooks as post_training_hooks
from seekformer.model.layers import RMSNorm

REPO = Path(__file__).resolve().parent.parent
PATCHED = {"model/expert_kernels.py": "seekformer.model", "model/layers.py": "seekformer.model",
           "training/optim.py": "seekformer.training", "training/grpo_prefix.py": "seekformer.training"}


def module_at(revision: str, path: str, package: str):
    """src/seekformer/`path` as it was at `revision`, imported as a module of `package`."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:src/seekformer/{path}"], check=True,
                            capture_output=True, text=True).stdout
    name = f"{package}._at_{revision}_{Path(path).stem}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = package
    sys.modules[name] = module
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


@contextlib.contextmanager
def revision_code(old: dict):
    """The update's hot paths of the revision (`old`: its modules by path) patched in."""
    saved = (expert_kernels.LoopedExperts, RMSNorm.forward, post_training_hooks.clip_grad_norm, grpo_prefix._to_rows)
    expert_kernels.LoopedExperts = old["model/expert_kernels.py"].LoopedExperts
    RMSNorm.forward = old["model/layers.py"].RMSNorm.forward
    post_training_hooks.clip_grad_norm = old["training/optim.py"].clip_grad_norm
    grpo_prefix._to_rows = old["training/grpo_prefix.py"]._to_rows
    try:
        yield
    finally:
        (expert_kernels.LoopedExperts, RMSNorm.forward, post_training_hooks.clip_grad_norm,
         grpo_prefix._to_rows) = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="git revision whose update code is compared")
    parser.add_argument("--steps", type=int, default=8, help="timed pairs of steps (after one warmup pair)")
    parser.add_argument("--block", type=int, default=3,
                        help="steps each variant runs in a row; only the last is timed (see the docstring)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old = {path: module_at(args.against, path, package) for path, package in PATCHED.items()}
    variants = {"revision": lambda: revision_code(old), "checkout": contextlib.nullcontext}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = seekformer_trainer(build_model_dir(Path(tmp) / "model", args.layers), Path(tmp) / "run", args,
                                     2 * args.block * (args.steps + 1))
        rollout = trainer._collect_rollouts()
        trainer._collect_rollouts = lambda: rollout  # every step trains on the same rollout
        for _ in range(args.steps + 1):
            for name, variant in variants.items():
                with variant():
                    for step in range(args.block):
                        start = time.process_time()
                        record = trainer.train_step()
                        if step == args.block - 1:  # the others settle the allocator after the other variant
                            cpu[name].append(time.process_time() - start)
                            wall[name].append(record["update_seconds"])
    tokens = sum(len(c) for c in rollout[0].completion_ids)
    print(f"GRPO update on one rollout ({args.prompts} prompts x {args.group} completions, {tokens} completion "
          f"tokens), {args.layers}-layer V3-style model, {args.dtype}; {machine()}; {args.steps} pairs after a warmup")
    for label, seconds in (("wall", wall), ("cpu", cpu)):
        ratios = [a / b for a, b in zip(seconds["revision"][1:], seconds["checkout"][1:])]
        print(f"{label:5} update s: {args.against} {statistics.median(seconds['revision'][1:]):.3f}, checkout "
              f"{statistics.median(seconds['checkout'][1:]):.3f}; {args.against} / checkout, median of pairs "
              f"{statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
