"""`seekformer export`: a distributed run's checkpoint as a hub-layout model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write the hub layout (config.json, model.safetensors, tokenizer) of a distributed run's latest checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, metavar="RUN_DIR", help="a run directory, or one of its checkpoints")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write")


def run(args: argparse.Namespace) -> int:
    from seekformer.distributed.checkpoint import export_run

    out = export_run(args.source, args.out)
    print(f"exported {args.source} to {out}")
    return 0
