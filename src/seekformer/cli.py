"""`seekformer <command>`: each command lives in `seekformer.commands.<name>` and exposes
`HELP`, `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> module under seekformer.commands
COMMANDS = {
    "info": "info",
    "data": "data",
    "engram-gates": "engram_gates",
    "train": "train",
    "demo": "demo",
    "plot": "plot",
    "generate": "generate",
    "sft": "sft",
    "distill": "distill",
    "serve": "serve",
    "grpo": "grpo",
    "quantize": "quantize",
    "export": "export",
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="seekformer", description="DeepSeek-family models in PyTorch")
    parser.add_argument("--version", action="version", version=f"seekformer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"seekformer.commands.{module_name}")
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, MemoryError) as exc:
        # user errors (bad config, checkpoint, data, arguments; a run too big for the machine) name what was
        # wrong: no traceback
        print(f"seekformer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
