"""`seekformer engram-gates`: colour each token of a text by its Engram gate, per Engram layer."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write an HTML page (and PNG) colouring each token by its Engram gate alpha, per Engram layer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory (with tokenizer.json)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to analyse")
    source.add_argument("--file", help="read the text from this file")
    parser.add_argument("--out", default="engram_gates.html", help="HTML output (default engram_gates.html)")
    parser.add_argument("--png", default=None, help="PNG output (default: the HTML path with .png)")
    parser.add_argument("--no-png", action="store_true", help="write only the HTML page")


def run(args: argparse.Namespace) -> int:
    from .. import load_model
    from ..engram_viz import trace_gates, write_gate_pages
    from ..tokenizer import load_tokenizer

    text = args.text if args.text is not None else read_text_file(Path(args.file))
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such model directory")
    png = None if args.no_png else (args.png or str(Path(args.out).with_suffix(".png")))
    for option, path in (("--out", args.out), ("--png", png)):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise FileNotFoundError(f"{option} {path}: directory {Path(path).parent} does not exist")
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    trace = trace_gates(model, tokenizer, text)
    for path in write_gate_pages(trace, args.out, png):
        print(f"wrote {path}")
    for layer, gates in trace.gates.items():
        top = sorted(zip(gates, trace.tokens), reverse=True)[:5]
        print(f"layer {layer}: mean alpha {sum(gates) / len(gates):.3f}; highest: "
              + ", ".join(f"{tok!r} {a:.2f}" for a, tok in top))
    return 0


def read_text_file(path: Path) -> str:
    """The text of --file, with errors that name it."""
    if not path.is_file():
        raise FileNotFoundError(f"--file {path}: no such file" if not path.exists() else f"--file {path} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--file {path} is not UTF-8 text (invalid byte at offset {exc.start})") from None
