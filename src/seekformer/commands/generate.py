"""`seekformer generate --model DIR --prompt TEXT`: stream a continuation to the terminal."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
HELP = "generate text from a prompt with a model directory (streams tokens; --mtp for speculative decoding)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory (config.json, weights)")
    parser.add_argument("--prompt", required=True, help="prompt text ('-' reads standard input)")
    parser.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or its directory (default: --model)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9; 1 = off)")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    parser.add_argument("--mtp", action="store_true",
                        help="speculative decoding with the model's Multi-Token Prediction module(s)")
    parser.add_argument("--draft-tokens", type=int, default=None,
                        help="tokens drafted per step with --mtp (default: number of MTP modules)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat format")
    parser.add_argument("--bos", action="store_true", help="prepend the BOS token (plain prompts)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="weights and cache dtype (default bf16: the fast path on CPUs with AMX)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="CPU threads (default 0: torch's default, or 1 when other processes keep the cores "
                        "busy, where more threads wait for each other on every operation)")
    parser.add_argument("--no-stats", action="store_true", help="do not print speed statistics to stderr")


def check_arguments(args: argparse.Namespace) -> None:
    """Every argument, before the model is loaded."""
    from ..inference.sampling import SamplingParams

    model = Path(args.model)
    if not model.is_dir():
        raise FileNotFoundError(f"--model {model}: no such model directory" if not model.exists()
                                else f"--model {model} is not a directory (expected config.json and weights)")
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"--model {model} holds no config.json: not a model directory")
    if args.tokenizer is not None and not Path(args.tokenizer).exists():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such file or directory")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.draft_tokens is not None and not args.mtp:
        raise ValueError("--draft-tokens needs --mtp")
    if args.draft_tokens is not None and args.draft_tokens < 1:
        raise ValueError(f"--draft-tokens must be >= 1, got {args.draft_tokens}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0 = automatic), got {args.threads}")
    SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def run(args: argparse.Namespace) -> int:
    from .. import load_model
    from ..inference import generate
    from ..inference.detokenize import IncrementalDetokenizer
    from ..runtime import resolve_device, set_cpu_threads
    from ..tokenizer import load_tokenizer

    check_arguments(args)
    device = resolve_device(args.device)
    if device.type == "cpu":
        set_cpu_threads(args.threads, lambda msg: print(msg, file=sys.stderr))
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    tokenizer = load_tokenizer(Path(args.tokenizer or args.model))
    model = load_model(args.model, dtype=DTYPES[args.dtype], device=device,
                       mtp="require" if args.mtp else "skip")  # plain decoding never reads the MTP layer
    if args.chat:
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
    else:
        ids = tokenizer.encode(prompt, add_bos=args.bos)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}: wrong --tokenizer?")
    stops = {tokenizer.eos_id}
    config_eos = model.config.eos_token_id
    stops.update(config_eos if isinstance(config_eos, list) else [] if config_eos is None else [config_eos])
    stream = generate(model, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=sorted(stops),
                      stream=True, speculative="mtp" if args.mtp else None,
                      num_draft_tokens=args.draft_tokens if args.mtp else None)
    text = IncrementalDetokenizer(tokenizer)
    for piece in stream:
        sys.stdout.write(text.push(piece.tokens))
        sys.stdout.flush()
    sys.stdout.write(text.flush() + "\n")
    sys.stdout.flush()
    if not args.no_stats:
        s = stream.output.stats
        line = (f"[{s.prompt_tokens} prompt tokens, {s.prefill_tokens_per_s:.1f} tok/s prefill; {s.new_tokens} new "
                f"tokens, {s.decode_tokens_per_s:.1f} tok/s decode; {stream.output.finish_reasons[0]}")
        if s.acceptance_rate is not None:
            line += f"; MTP acceptance {100 * s.acceptance_rate:.0f}%, {1 + s.mean_accepted:.2f} tokens/step"
        print(line + "]", file=sys.stderr)
    return 0
