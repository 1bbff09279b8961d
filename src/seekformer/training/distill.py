"""Distillation data as DeepSeek-R1 made it: a teacher writes completions (with its `<think>` reasoning
when it has it) for a file of prompts, optionally kept only when a reward accepts them (rejection
sampling); the student is then fine-tuned on them by SFT (`seekformer sft --data traces.jsonl`).

The prompts run in fixed batches through seekformer's batched generation (latent cache, absorbed
MLA). Batch k samples with the seed `(seed, k)`, so a batch always yields the same completions. The
output is append-only JSONL: a batch's accepted traces are written in one write and flushed, then
`OUT.progress.json` (written atomically) records the batch as done. An interrupted run resumes after
its last finished batch: lines of an unfinished batch (and a half-written last line) are dropped first.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..io_utils import atomic_write_text
from ..model.transformer import Transformer
from ..tokenizer import THINK_START, TOKENIZER_FILE, Tokenizer, load_tokenizer
from .chat_data import ChatRecord, read_chat_jsonl

PROGRESS_SUFFIX = ".progress.json"
RewardFn = Callable[..., Sequence[float]]


def load_reward(spec: str) -> RewardFn:
    """A reward function by `module:function`, or by name from `seekformer.training.rewards`.

    It is called as `fn(completions, answers, prompts=...)` and returns one number per completion."""
    module_name, sep, name = spec.partition(":")
    if not sep:
        module_name, name = "seekformer.training.rewards", spec
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {module_name} has no function {name!r}")
    return fn


def score(fn: RewardFn, spec: str, completions: list[str], answers: list[Any], prompts: list[str]) -> list[float]:
    """The reward of each completion, or a ValueError naming the reward when it raises or returns
    something other than one finite number per completion."""
    try:
        values = list(fn(completions, answers, prompts=prompts))
    except Exception as exc:
        raise ValueError(f"reward {spec!r} raised {type(exc).__name__}: {exc}") from exc
    if len(values) != len(completions):
        raise ValueError(f"reward {spec!r} returned {len(values)} values for {len(completions)} completions")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"reward {spec!r} returned {value!r}; expected a finite number per completion")
    return [float(v) for v in values]


@dataclass
class DistillStats:
    prompts: int
    batches: int
    generated: int  # completions generated in this call
    accepted: int  # of those, written to the output
    skipped_batches: int  # batches already done by an earlier call


def _settings_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _resume_point(out: Path, progress_path: Path, key: str) -> int:
    """Batches already done; the output is cut back to exactly their lines."""
    if not progress_path.is_file():
        if out.exists() and out.stat().st_size:
            raise ValueError(f"{out} exists but has no {progress_path.name}: not written by seekformer distill; "
                             "choose another output file")
        return 0
    progress = json.loads(progress_path.read_text())
    if progress.get("settings") != key:
        raise ValueError(f"{out} was started with other settings (teacher, prompts, sampling, reward); finish it "
                         "with the same ones or choose another output file")
    done = int(progress["batches_done"])
    keep = []
    if out.exists():
        for line in out.read_text(encoding="utf-8").splitlines(keepends=True):
            if not line.endswith("\n"):
                break  # half written when the run stopped
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if record.get("batch", done) < done:
                keep.append(line)
    atomic_write_text(out, "".join(keep))
    return done


def generate_traces(teacher: str | Path, prompts: str | Path, out: str | Path, *, samples: int = 1,
                    batch_size: int = 16, max_new_tokens: int = 512, temperature: float = 0.7,
                    top_p: float | None = None, seed: int = 0, think: bool = False, reward: str | None = None,
                    min_reward: float = 1.0, keep_truncated: bool = False, tokenizer: str | Path | None = None,
                    dtype: torch.dtype = torch.float32, device: str = "cpu", progress: bool | None = None,
                    echo: Callable[[str], None] | None = None) -> DistillStats:
    """Write the teacher's completions of every prompt (`samples` each) to the JSONL `out` as SFT
    records: `{"messages": [...prompt, {"role": "assistant", ...}], "prompt_line", "sample", "batch",
    "finish_reason", "reward"?}` plus the prompt record's other keys (e.g. `answer`).

    `prompts`: JSONL of `{"prompt": ...}` or `{"messages": [... ending with a user turn]}`, with an
    optional `answer` handed to the reward. With `reward` only completions scoring >= `min_reward`
    are kept; truncated ones (no end of turn within `max_new_tokens`) are dropped unless `keep_truncated`.
    `think` opens the assistant turn with `<think>\\n` as DeepSeek-R1 prompts it."""
    for name, value in (("samples", samples), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    echo = echo or (lambda msg: print(msg, file=sys.stderr))
    progress = sys.stderr.isatty() if progress is None else progress
    teacher, out = Path(teacher), Path(out)
    records = read_chat_jsonl(prompts, need_assistant=False)
    tok_dir = Path(tokenizer or teacher)
    if not (tok_dir / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{tok_dir} holds no tokenizer ({TOKENIZER_FILE}); the teacher's prompts must be "
                                "written with its own tokenizer (--tokenizer DIR)")
    tok = load_tokenizer(tok_dir)
    reward_fn = load_reward(reward) if reward else None
    model = Transformer.from_pretrained(teacher, dtype=dtype, device=device)
    context = model.config.max_position_embeddings
    prompt_texts = [tok.apply_chat_template(r.messages, add_generation_prompt=True, think=think) for r in records]
    prompt_ids = [_prompt_ids(tok, text, record, context) for text, record in zip(prompt_texts, records)]

    settings = {"teacher": str(teacher.resolve()), "prompts": hashlib.sha256(Path(prompts).read_bytes()).hexdigest(),
                "samples": samples, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p, "seed": seed, "think": think, "reward": reward,
                "min_reward": min_reward, "keep_truncated": keep_truncated}
    progress_path = out.with_name(out.name + PROGRESS_SUFFIX)
    key = _settings_key(settings)
    done = _resume_point(out, progress_path, key)
    items = [(i, j) for i in range(len(records)) for j in range(samples)]
    n_batches = math.ceil(len(items) / batch_size)
    if done:
        echo(f"{out}: {done} of {n_batches} batches already done; continuing")
    stop = sorted({tok.eos_id} | set(_ids(model.config.eos_token_id)))
    generated = accepted = 0
    bar = tqdm(total=n_batches, initial=done, unit="batch", disable=not progress, dynamic_ncols=True)
    try:
        for k in range(done, n_batches):
            batch = items[k * batch_size: (k + 1) * batch_size]
            lines = _run_batch(model, tok, records, prompt_texts, prompt_ids, batch, k, stop, reward_fn, reward,
                               settings)
            generated += len(batch)
            accepted += len(lines)
            _append(out, lines)
            atomic_write_text(progress_path, json.dumps({"settings": key, "batches_done": k + 1,
                                                         "batches": n_batches}) + "\n")
            bar.update(1)
    finally:
        bar.close()
    return DistillStats(len(records), n_batches, generated, accepted, done)


def _ids(value) -> list[int]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _prompt_ids(tok: Tokenizer, text: str, record: ChatRecord, context: int) -> list[int]:
    ids = tok.encode(text)
    if len(ids) >= context:
        raise ValueError(f"{record.source}: the prompt has {len(ids)} tokens, which fill the teacher's context of "
                         f"{context} tokens")
    return ids


def _run_batch(model, tok: Tokenizer, records: list[ChatRecord], prompt_texts: list[str], prompt_ids: list[list[int]],
               batch: list[tuple[int, int]], k: int, stop: list[int], reward_fn, reward: str | None,
               settings: dict[str, Any]) -> list[str]:
    """The JSONL lines of batch k's accepted completions."""
    from ..inference import generate

    output = generate(model, [prompt_ids[i] for i, _ in batch], max_new_tokens=settings["max_new_tokens"],
                      temperature=settings["temperature"], top_p=settings["top_p"],
                      seed=int(hashlib.sha256(f"{settings['seed']}:{k}".encode()).hexdigest()[:8], 16),
                      stop_tokens=stop, pad_token_id=tok.pad_id)
    completions = []
    for (i, _), tokens, reason in zip(batch, output.tokens, output.finish_reasons):
        body = tokens[:-1] if reason == "stop" else tokens  # the end-of-turn token is the template's to add
        opened = prompt_texts[i].endswith(THINK_START + "\n")  # the prompt opened the reasoning: part of the trace
        completions.append((THINK_START + "\n" if opened else "") + tok.decode(body))
    rewards = None
    if reward_fn is not None:
        answers = [records[i].extra.get("answer") for i, _ in batch]
        prompts = [prompt_texts[i] for i, _ in batch]
        rewards = score(reward_fn, reward, completions, answers, prompts)
    lines = []
    for n, ((i, j), completion, reason) in enumerate(zip(batch, completions, output.finish_reasons)):
        if reason != "stop" and not settings["keep_truncated"]:
            continue
        if rewards is not None and rewards[n] < settings["min_reward"]:
            continue
        record = records[i]
        trace = {**record.extra, "messages": [*record.messages, {"role": "assistant", "content": completion}],
                 "prompt_line": int(record.source.rsplit(":", 1)[1]), "sample": j, "batch": k,
                 "finish_reason": reason}
        if rewards is not None:
            trace["reward"] = rewards[n]
        lines.append(json.dumps(trace, ensure_ascii=False) + "\n")
    return lines


def _append(out: Path, lines: list[str]) -> None:
    """One write of whole lines, flushed to disk before the batch is marked done."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as fh:
        fh.write("".join(lines))
        fh.flush()
        os.fsync(fh.fileno())
