"""`seekformer serve --model DIR`: an OpenAI-compatible HTTP server (continuous batching, paged latent cache)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .generate import DTYPES

HELP = "serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /metrics)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory (config.json, weights)")
    parser.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json or its directory (default: --model)")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the model id clients send (default: the model directory's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: no authentication)")
    parser.add_argument("--max-batch", type=int, default=32, help="most sequences decoding together (default 32)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="most sequences waiting; more requests get HTTP 429 (default 256)")
    parser.add_argument("--cache-tokens", type=int, default=None,
                        help="latent cache size in tokens, all sequences together "
                             "(default: min(max_batch x context, max(65536, context)))")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per cache block (default 16)")
    parser.add_argument("--token-budget", type=int, default=None,
                        help="most tokens per engine step, decodes + prompt chunks (default max(512, 4 x max_batch))")
    parser.add_argument("--mtp", action="store_true",
                        help="speculative decoding with the model's first Multi-Token Prediction module "
                             "(greedy requests; one drafted token per step, accepted per sequence)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: all cores, or 1 when other processes keep them busy)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights and cache dtype")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve.api import create_app
    except ImportError as exc:
        raise ValueError(f"serving needs the 'serve' extra: pip install 'seekformer[serve]' ({exc})") from exc
    from .. import load_model
    from ..runtime import resolve_device, set_cpu_threads
    from ..serve import Engine
    from ..tokenizer import load_tokenizer

    for name in ("port", "max_batch", "max_queue", "block_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (Path(args.model) / "config.json").is_file():
        raise FileNotFoundError(f"--model {args.model}: not a model directory (no config.json)")
    device = resolve_device(args.device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        threads = set_cpu_threads(args.threads, lambda msg: print(msg, file=sys.stderr))
    tokenizer = load_tokenizer(Path(args.tokenizer or args.model))
    model = load_model(args.model, dtype=DTYPES[args.dtype], device=device, mtp="require" if args.mtp else "skip")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}: wrong --tokenizer?")
    engine = Engine(model, tokenizer, max_batch=args.max_batch, block_size=args.block_size,
                    cache_tokens=args.cache_tokens, token_budget=args.token_budget, max_queue=args.max_queue,
                    speculative="mtp" if args.mtp else None)
    name = args.served_model_name or Path(args.model).resolve().name
    print(f"seekformer serve: {name} on http://{args.host}:{args.port}/v1 ({threads} threads, "
          f"{engine.pool.num_blocks} cache blocks of {args.block_size} tokens)", flush=True)
    uvicorn.run(create_app(engine, name, args.api_key), host=args.host, port=args.port, log_level=args.log_level)
    return 0
