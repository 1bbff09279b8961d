"""GRPO rollout time: the few-row bf16 kernel and shared prompts against oneDNN's packs and per-row prefills.

    cd benchmarks && PYTHONPATH=../src python grpo_rollout.py [--rollouts 6 --prompts 4 --group 8 --tokens 32]

The model, task and settings of `grpo.py` (tiny V3-style model, bf16 rollout copy refreshed and
packed before every rollout, temperature 1). Rollouts of the same prompts alternate in one process
between "plain" (decode products through oneDNN's packs, absorbed attention through SDPA, each row
its own prefill: the paths before `model/bf16_rows.py` and `share_prompts`) and "default" (this
code's defaults), each pair with the same seed. Printed: the median rollout seconds of each, the
median over pairs of plain / default, and how many rows of each pair sampled the same tokens.
The first pair is warmup.
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import machine
from grpo import build_model_dir, seekformer_trainer

import seekformer.training.grpo as grpo_module
from seekformer.inference import generate
from seekformer.model import bf16_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=6, help="timed pairs (after one warmup pair)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not bf16_rows.available():
        raise SystemExit("the bf16 few-row kernel does not run here: nothing to compare")
    library = bf16_rows._load()

    def use(default: bool) -> None:
        bf16_rows._library = library if default else None  # plain: `available()` is False, oneDNN packs
        grpo_module.generate = generate if default else functools.partial(generate, share_prompts=False)

    args.dtype = "bf16"
    with tempfile.TemporaryDirectory() as tmp:
        trainer = seekformer_trainer(build_model_dir(Path(tmp) / "model", args.layers), Path(tmp) / "run", args,
                                     steps=1)
        examples = trainer.task.train_batch(random.Random(0), args.prompts)
        seconds: dict[bool, list[float]] = {True: [], False: []}
        same = []
        try:
            for pair in range(args.rollouts + 1):
                tokens = {}
                for default in (False, True):
                    use(default)
                    start = time.perf_counter()
                    tokens[default] = trainer.rollout(examples, seed=pair).completion_ids
                    if pair:
                        seconds[default].append(time.perf_counter() - start)
                if pair:
                    same.append(sum(a == b for a, b in zip(tokens[False], tokens[True])))
        finally:
            use(True)
    ratios = [plain / default for plain, default in zip(seconds[False], seconds[True])]
    rows = args.prompts * args.group
    print(f"GRPO rollout, {args.prompts} prompts x {args.group} completions of <= {args.tokens} tokens, "
          f"{args.layers}-layer V3-style model, bf16; {machine()}; {args.rollouts} pairs")
    listed = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"rollout s: plain {statistics.median(seconds[False]):.3f}, default {statistics.median(seconds[True]):.3f}; "
          f"plain / default, median of pairs {statistics.median(ratios):.2f}x ({listed})")
    print(f"rows with the same tokens in both, per pair (of {rows}): {same}")


if __name__ == "__main__":
    main()
