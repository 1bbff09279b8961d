"""`seekformer plot RUN`: draw a run's metrics as PNG files."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "draw loss curves, MaxVio per MoE layer and the expert-load heatmap of a run (PNG)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN", help="a run directory (holding metrics.jsonl)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="where to write the PNGs (default RUN/plots)")


def run(args: argparse.Namespace) -> int:
    from seekformer.training.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
