"""Loopback load test: `seekformer serve` against `transformers serve --continuous-batching`.

    python benchmarks/serve.py [--concurrency 1,4,16 --requests-per-client 2 --max-tokens 32 --threads 1]

Builds a DeepSeek-V3-style model (random weights, bf16; --config: decode.py's FULL_LATENT, the V3
latent shape kv_lora 512 / rope 64 / 16 heads, or common.py's smaller V3_STYLE) with a BPE tokenizer
of the same vocabulary trained on Python's standard library, saves it once, and starts both servers on it as
subprocesses on loopback ports (same dtype, same torch thread count). For each concurrency level N,
N clients stream chat completions (greedy, `max_tokens` each) for a fixed number of requests, first
against one server then the other (the order alternates between rounds, so a load change on a
shared machine hits both). Reported per server and level: requests/s, output tokens/s (completion
tokens from the final usage chunk / wall time), time to first token and inter-token latency p50/p99,
errors (must be 0), and the seekformer/transformers ratios. Writes a PNG of throughput and latency
against concurrency (--plot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from common import V3_STYLE, machine
from decode import FULL_LATENT

from seekformer import ModelConfig, Transformer
from seekformer.tokenizer import load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _corpus(max_bytes: int) -> list[str]:
    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return texts


CONFIGS = {"full-latent": {**V3_STYLE, **FULL_LATENT}, "v3-style": V3_STYLE}


def build_model(directory: Path, config_name: str) -> None:
    """A V3-style model with random weights and a tokenizer of the same vocabulary size."""
    if (directory / "model.safetensors").exists() and (directory / "tokenizer.json").exists():
        return
    shape = CONFIGS[config_name]
    tok = train_tokenizer(_corpus(4_000_000), vocab_size=shape["vocab_size"])
    torch.manual_seed(0)
    config = ModelConfig.from_hf({"model_type": "deepseek_v3", **shape, "eos_token_id": tok.eos_id,
                                  "bos_token_id": tok.bos_id})
    model = Transformer(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    tok.save(directory)


@dataclass
class Server:
    name: str
    command: list[str]
    port: int
    model_id: str
    env: dict = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log: Path, timeout: float = 300) -> None:
        self.process = subprocess.Popen(self.command, env={**os.environ, **self.env}, stdout=log.open("w"),
                                        stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {log}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not start in {timeout} s; see {log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""


async def _one(client: httpx.AsyncClient, server: Server, messages: list[dict], max_tokens: int) -> RequestResult:
    body = {"model": server.model_id, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, tokens = [], 0
    try:
        async with client.stream("POST", server.base + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return RequestResult(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        times.append(time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return RequestResult(False, error=f"{type(exc).__name__}: {exc}")
    if not times:
        return RequestResult(False, error="no content streamed")
    return RequestResult(True, times[0] - start, [b - a for a, b in zip(times, times[1:])], tokens)


async def load(server: Server, prompts: list[list[dict]], concurrency: int, max_tokens: int) -> dict:
    """`concurrency` clients run through `prompts` (one request each); the load's statistics."""
    todo = list(prompts)
    results: list[RequestResult] = []

    async def client_loop(client):
        while todo:
            results.append(await _one(client, server, todo.pop(), max_tokens))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    good = [r for r in results if r.ok]
    ttft = sorted(r.ttft for r in good)
    itl = sorted(g for r in good for g in r.gaps)

    def pct(values, q):
        return values[min(int(q * len(values)), len(values) - 1)] if values else float("nan")

    return {"requests_per_s": len(good) / wall, "tokens_per_s": sum(r.tokens for r in good) / wall,
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99), "itl_p50": pct(itl, 0.5),
            "itl_p99": pct(itl, 0.99), "errors": len(results) - len(good), "wall": wall,
            "tokens": sum(r.tokens for r in good),
            "first_error": next((r.error for r in results if not r.ok), "")}


def make_prompts(tokenizer_dir: Path, count: int, seed: int, words: tuple[int, int]) -> list[list[dict]]:
    tok = load_tokenizer(tokenizer_dir)
    corpus, lengths = " ".join(_corpus(400_000)).split(), words
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        n = rng.randint(*lengths)
        start = rng.randrange(len(corpus) - n)
        prompts.append([{"role": "user", "content": " ".join(corpus[start:start + n])}])
    assert all(tok.encode(tok.apply_chat_template(p)) for p in prompts)
    return prompts


def plot(rows: dict, levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, style in (("seekformer", "o-"), ("transformers", "s--")):
        axes[0].plot(levels, [rows[name][n]["tokens_per_s"] for n in levels], style, label=name)
        axes[1].plot(levels, [rows[name][n]["ttft_p99"] for n in levels], style, label=name)
        axes[2].plot(levels, [1000 * rows[name][n]["itl_p50"] for n in levels], style, label=name)
    for ax, title in zip(axes, ("output tokens/s", "TTFT p99 (s)", "inter-token latency p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(n) for n in levels])
        ax.set_xlabel("concurrent streaming clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--rounds", type=int, default=1, help="repeats of every level (alternating order)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full-latent")
    parser.add_argument("--prompt-words", default="100,300", help="range of words per prompt (min,max)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="where the benchmark model is built once (default: a temp dir per --config)")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "serve_load.png")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    words = tuple(int(x) for x in args.prompt_words.split(","))
    if args.model_dir is None:
        args.model_dir = Path(tempfile.gettempdir()) / f"seekformer-serve-bench-{args.config}"
    build_model(args.model_dir, args.config)
    threads_env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    src = str(ROOT / "src")
    ours = Server("seekformer", [sys.executable, "-m", "seekformer.cli", "serve", "--model", str(args.model_dir),
                                 "--port", "0", "--dtype", "bf16", "--threads", str(args.threads),
                                 "--max-batch", str(max(levels)), "--log-level", "warning",
                                 "--served-model-name", "bench"],
                  0, "bench", {"PYTHONPATH": src, **threads_env})
    theirs = Server("transformers", [str(Path(sys.executable).with_name("transformers")), "serve",
                                     str(args.model_dir), "--continuous-batching", "--device", "cpu",
                                     "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", "0",
                                     "--log-level", "warning"],
                    0, str(args.model_dir), threads_env)
    servers = [ours, theirs]
    for server in servers:
        server.port = _free_port()
        server.command[server.command.index("--port") + 1] = str(server.port)
    logs = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    rows: dict[str, dict[int, dict]] = {s.name: {} for s in servers}
    try:
        for server in servers:
            server.start(logs / f"{server.name}.log")
            warm = make_prompts(args.model_dir, 2, seed=99, words=words)
            asyncio.run(load(server, warm, 2, args.max_tokens))
        print(f"config {args.config}, prompts of {words[0]}-{words[1]} words, {args.max_tokens} new tokens; "
              f"machine: {machine()}; servers: {args.threads} torch thread(s) each; load average "
              f"{os.getloadavg()[0]:.1f}; logs in {logs}")
        for level in levels:
            prompts = make_prompts(args.model_dir, level * args.requests_per_client, seed=level, words=words)
            for r in range(args.rounds):
                order = servers if (r + levels.index(level)) % 2 == 0 else servers[::-1]
                for server in order:
                    stats = asyncio.run(load(server, prompts, level, args.max_tokens))
                    best = rows[server.name].get(level)
                    if best is None or stats["tokens_per_s"] > best["tokens_per_s"]:
                        rows[server.name][level] = stats
            for server in servers:
                s = rows[server.name][level]
                print(f"{server.name:>12} N={level:<3} {s['requests_per_s']:6.2f} req/s {s['tokens_per_s']:8.1f} tok/s "
                      f"TTFT p50/p99 {s['ttft_p50']:.3f}/{s['ttft_p99']:.3f} s  ITL p50/p99 "
                      f"{1000 * s['itl_p50']:.1f}/{1000 * s['itl_p99']:.1f} ms  errors {s['errors']} "
                      f"({s['tokens']} tokens in {s['wall']:.1f} s) {s['first_error']}")
            a, b = rows["seekformer"][level], rows["transformers"][level]
            print(f"{'ratio':>12} N={level:<3} output tok/s x{a['tokens_per_s'] / b['tokens_per_s']:.2f}, "
                  f"TTFT p99 x{b['ttft_p99'] / a['ttft_p99']:.2f} lower, "
                  f"ITL p50 x{b['itl_p50'] / a['itl_p50']:.2f} lower", flush=True)
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    finally:
        for server in servers:
            server.stop()
    if args.plot:
        plot(rows, levels, args.plot)
        print(f"plot: {args.plot}")
    if any(rows[name][n]["errors"] for name in rows for n in levels):
        sys.exit("errors during the load test")


if __name__ == "__main__":
    main()
