"""`seekformer data prepare`: tokenize a corpus into packed train/val shards."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HELP = "prepare training data: corpus -> tokenizer + packed token shards"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    prep = sub.add_parser(
        "prepare",
        help="tokenize text/JSONL files (default: the Python standard library's sources)",
        description="Tokenize a corpus into OUT/{train,val}.bin + meta.json + tokenizer.json. "
        "Reuses OUT when it already holds the same dataset.",
    )
    prep.add_argument(
        "--input", action="extend", nargs="+", default=None, metavar="PATH_OR_GLOB",
        help="text file, .jsonl file ('text' field per line) or quoted glob such as 'docs/**/*.txt'; "
        "repeatable. Default: the Python standard library's .py files and pydoc topics",
    )
    tok = prep.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="PATH", help="existing tokenizer (directory or tokenizer.json)")
    tok.add_argument("--vocab-size", type=int, default=8192, help="train a BPE tokenizer of this size (8192)")
    prep.add_argument("--val-fraction", type=float, default=0.01, help="documents held out for val (0.01)")
    prep.add_argument("--max-docs", type=int, metavar="N", help="use only the first N documents")
    prep.add_argument("--max-bytes", type=int, metavar="N", help="use only the first N bytes of text")
    prep.add_argument("--seed", type=int, default=0, help="seed of the train/val split (0)")
    prep.add_argument("--num-workers", type=int, default=None, metavar="N",
                      help="tokenizer threads (default: all cores; 1 = single-threaded)")
    prep.add_argument("--force", action="store_true", help="rebuild even if OUT already holds this dataset")
    prep.add_argument("--no-progress", action="store_true", help="no progress bars")
    prep.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")


def run(args: argparse.Namespace) -> int:
    if args.data_command != "prepare":  # argparse only allows the actions above
        raise ValueError(f"unknown action {args.data_command!r}")
    from seekformer.tokenizer import SPECIAL_TOKENS

    # checked here, before the corpus is read (preparing the default corpus takes a while)
    smallest = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and the special tokens
    if args.tokenizer is None and args.vocab_size < smallest:
        raise ValueError(f"--vocab-size must be >= {smallest} (256 byte tokens + {len(SPECIAL_TOKENS)} special "
                         f"tokens), got {args.vocab_size}")
    if args.tokenizer is not None and not Path(args.tokenizer).exists():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such file or directory")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a directory")
    if args.num_workers is not None:
        if args.num_workers < 1:
            raise ValueError(f"--num-workers must be >= 1, got {args.num_workers}")
        # tokenizers' Rust pool reads this once, when first used in the process
        os.environ.setdefault("RAYON_NUM_THREADS", str(args.num_workers))

    from seekformer.data import prepare_data

    meta = prepare_data(
        args.input, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
        val_fraction=args.val_fraction, seed=args.seed, max_docs=args.max_docs, max_bytes=args.max_bytes,
        num_workers=args.num_workers, force=args.force, progress=not args.no_progress,
    )
    out = Path(args.out)
    print(f"{'cached' if meta['cached'] else 'prepared'} dataset in {out}")
    print(f"  tokenizer  {out / meta['tokenizer']}  vocab {meta['vocab_size']}"
          f" ({'trained' if meta['tokenizer_trained'] else 'given'})")
    for split, info in meta["splits"].items():
        print(f"  {split:<5}      {out / info['file']}  {info['tokens']:,} tokens, {info['docs']:,} docs"
              f" ({meta['dtype']})")
    print(f"  meta       {out / 'meta.json'}")
    return 0
