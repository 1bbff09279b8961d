"""Tiny tokenizers, model directories and chat data shared by the SFT and distillation tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from conftest import TINY_TRAIN_RUN

from seekformer.model.transformer import Transformer
from seekformer.tokenizer import SPECIAL_TOKENS, Tokenizer, train_tokenizer
from seekformer.training.checkpointing import write_model_dir
from seekformer.training.run_config import RunConfig


def arithmetic(n: int, seed: int = 0) -> list[dict]:
    """{"prompt": "a+b=", "completion": "c", "answer": "c"} records."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b), "answer": str(a + b)})
    return rows


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def make_tokenizer(extra_special: tuple[str, ...] = (), vocab_size: int = 300) -> Tokenizer:
    texts = [r["prompt"] + r["completion"] + " the answer is" for r in arithmetic(300)] * 2
    return train_tokenizer(texts, vocab_size=vocab_size, special_tokens=(*SPECIAL_TOKENS, *extra_special))


def make_model_dir(directory: Path, tokenizer: Tokenizer | None, seed: int = 0, *overrides: str) -> Path:
    """A 2-layer V3-style model (MLA, MoE, one MTP module) over the tokenizer's vocabulary, saved with
    the tokenizer (none when `tokenizer` is None)."""
    tok = tokenizer or make_tokenizer()
    cfg = RunConfig()
    cfg.apply_overrides([*TINY_TRAIN_RUN, *overrides])
    config = cfg.model_config(tok.vocab_size, {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                                               "pad_token_id": tok.pad_id})
    torch.manual_seed(seed)
    model = Transformer(config)
    write_model_dir(model, tok, directory)
    if tokenizer is None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (directory / name).unlink()
    return directory
