"""Activation checkpointing on the demo model: the activation memory it saves and the step time it costs.

    PYTHONPATH=src python benchmarks/activation_checkpointing.py [--steps 6 --threads 2 --set data.seq_len=1024]

Builds the `demo` run preset (tiny-v3, 8 x 256 tokens per step, bf16 autocast) twice from the same seed,
with `run.activation_checkpointing` off and on, and prints for each:
- held bytes: what the forward of one micro-batch keeps alive for its backward, per token — the
  distinct storages autograd saves (`saved_tensors_hooks`) plus the blocks' input tensors (what a
  checkpointed block keeps instead of its activations; already counted when autograd saves them);
- peak RSS above the resident size before the step, over one training step, in a fresh process each
  (`MALLOC_MMAP_THRESHOLD_` fixed, so freed tensors go back to the system and RSS follows the live
  ones; includes gradients and temporaries, equal in both);
- seconds per optimizer step, the two trainers' steps interleaved in one process (median), and the ratio.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from seekformer.training.pretrain import Trainer
from seekformer.training.run_config import RunConfig

QUIET = {"progress": False, "echo": lambda msg: None}


def build(checkpointing: bool, threads: int, overrides: list[str], run_dir: Path) -> Trainer:
    cfg = RunConfig.preset("demo")
    cfg.apply_overrides(["run.fit_to_time=false", f"run.threads={threads}", "run.device='cpu'",
                         f"run.activation_checkpointing={str(checkpointing).lower()}", *overrides])
    return Trainer(cfg, run_dir, **QUIET)


def held_bytes(trainer: Trainer) -> tuple[int, int]:
    """(bytes the forward of one micro-batch holds for the backward, tokens of the micro-batch)."""
    x, y = next(trainer.sampler)
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    def block_inputs(module, args, kwargs):
        for t in (*args, *kwargs.values()):
            keep(t)

    blocks = [*trainer.model.model.layers, *trainer.model.mtp]
    hooks = [b.register_forward_pre_hook(block_inputs, with_kwargs=True) for b in blocks]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            losses, _ = trainer.losses(x, y, 0.3, with_mtp=True)
        losses["total"].backward()
    finally:
        for h in hooks:
            h.remove()
    trainer.model.zero_grad(set_to_none=True)
    return sum(storages.values()), x.numel()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_probe(checkpointing: bool, threads: int, overrides: list[str]) -> None:
    """In this (fresh) process: two warm-up steps, then the peak RSS above the pre-step RSS over one step."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build(checkpointing, threads, overrides, Path(tmp) / "run")
        for _ in range(2):
            trainer.train_step()
        base, peak, done = rss_bytes(), [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], rss_bytes())
                time.sleep(0.0005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        trainer.train_step()
        done.set()
        sampler.join()
        print(max(peak[0] - base, 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each trainer")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="run config overrides")
    parser.add_argument("--rss-probe", choices=("off", "on"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_probe:
        peak_rss_probe(args.rss_probe == "on", args.threads, args.set)
        return 0
    torch.set_num_threads(args.threads)
    modes = {"off": False, "on": True}
    peaks = {}
    for name in modes:  # fresh processes first: the timing run below does not disturb them
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        cmd = [sys.executable, __file__, "--rss-probe", name, "--threads", str(args.threads)]
        cmd += [f"--set={s}" for s in args.set]
        peaks[name] = int(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.split()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: build(on, args.threads, args.set, Path(tmp) / name) for name, on in modes.items()}
        held = {name: held_bytes(t) for name, t in trainers.items()}
        times: dict[str, list[float]] = {name: [] for name in modes}
        for step in range(args.steps + 1):  # the first step of each is a warm-up
            for name, trainer in trainers.items():
                start = time.perf_counter()
                trainer.train_step()
                if step:
                    times[name].append(time.perf_counter() - start)
    cfg = trainers["off"].cfg
    print(f"demo model ({trainers['off'].n_params.total / 1e6:.2f}M parameters), {cfg.data.batch_size} x "
          f"{cfg.data.seq_len} tokens per micro-batch, {cfg.run.dtype}, {args.threads} thread(s), "
          f"torch {torch.__version__}")
    print(f"{'checkpointing':>13} {'held MB':>9} {'held B/token':>12} {'peak RSS MB':>11} {'s/step':>8}")
    median = {name: statistics.median(t) for name, t in times.items()}
    for name in modes:
        total, tokens = held[name]
        print(f"{name:>13} {total / 1e6:9.1f} {total / tokens:12,.0f} {peaks[name] / 1e6:11.1f} {median[name]:8.3f}")
    print(f"held memory on/off: {held['on'][0] / held['off'][0]:.3f}; peak RSS on/off: "
          f"{peaks['on'] / max(peaks['off'], 1):.3f}; step time on/off: {median['on'] / median['off']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
