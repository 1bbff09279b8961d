"""Distillation at toy scale: does a student learn more from a teacher's reasoning traces than from
the bare answers?

Task: two-digit addition ("47+85=" -> "132"), 2,000 training and 200 held-out problems.
1. A teacher (4 layers, hidden 128) is fine-tuned from random weights on worked solutions
   ("<think>7+5=12 carry 1, 4+8+1=13</think>132").
2. `generate_traces` has it answer the training prompts (sampled at temperature 0.7, with `<think>`),
   keeping only correct final answers (rejection sampling).
3. Students of the same random start (2 layers, hidden 64) get the same number of SFT steps: on the
   bare answers of the same problems, on the teacher's kept traces, and on the traces with logit
   distillation added (`loss.teacher`: half CE, half forward KL to the teacher's distribution).
Held-out accuracy is greedy generation's final answer (the text after `</think>`) against the sum.

    python benchmarks/distill.py [--steps 600] [--out DIR]

Stages whose results are already in `--out` (a trained model's `final/`, the traces) are reused.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from seekformer import generate, load_model
from seekformer.model.transformer import Transformer
from seekformer.tokenizer import SPECIAL_TOKENS, THINK_END, THINK_START, train_tokenizer
from seekformer.training.checkpointing import write_model_dir
from seekformer.training.distill import generate_traces
from seekformer.training.run_config import RunConfig
from seekformer.training.sft import SFTConfig, SFTTrainer

SMALL = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=128",
         "model.moe_intermediate_size=32", "model.n_routed_experts=8", "model.num_experts_per_tok=2",
         "model.n_group=2", "model.topk_group=1", "model.num_attention_heads=2", "model.kv_lora_rank=32",
         "model.q_lora_rank=48", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
         "mtp.depth=0"]
LARGE = [s.replace("hidden_size=64", "hidden_size=128").replace("num_hidden_layers=2", "num_hidden_layers=4")
         .replace("intermediate_size=128", "intermediate_size=256") for s in SMALL]


def problems(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]


def worked(a: int, b: int) -> str:
    units = a % 10 + b % 10
    tens = a // 10 + b // 10 + units // 10
    return f"{THINK_START}{a % 10}+{b % 10}={units} carry {units // 10}, " \
           f"{a // 10}+{b // 10}+{units // 10}={tens}{THINK_END}{a + b}"


def final_answer(text: str) -> str:
    return text.split(THINK_END)[-1].strip()


def correct(completions, answers, **_):
    """Accuracy reward for generate_traces: the final answer equals the sum."""
    return [float(final_answer(c) == str(a)) for c, a in zip(completions, answers)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def new_model(directory: Path, tokenizer, overrides: list[str], seed: int) -> Path:
    cfg = RunConfig()
    cfg.apply_overrides(overrides)
    config = cfg.model_config(tokenizer.vocab_size, {"bos_token_id": tokenizer.bos_id,
                                                     "eos_token_id": tokenizer.eos_id,
                                                     "pad_token_id": tokenizer.pad_id})
    torch.manual_seed(seed)
    write_model_dir(Transformer(config), tokenizer, directory)
    return directory


def fine_tune(model_dir: Path, data: Path, out: Path, steps: int, *extra: str) -> Path:
    if (out / "final").is_dir():
        return out / "final"
    cfg = SFTConfig()
    cfg.apply_overrides([f"model.dir='{model_dir}'", f"data.train='{data}'", "data.val_fraction=0",
                         "data.batch_size=32", "optim.lr=3e-3", f"run.steps={steps}", "run.eval_every=0",
                         "run.save_every=0", "run.log_every=50", "schedule.warmup_steps=20", "run.threads=1", *extra])
    return SFTTrainer(cfg, out, progress=False, echo=lambda _: None).train().final_dir


def accuracy(model_dir: Path, held_out: list[tuple[int, int]]) -> float:
    from seekformer.tokenizer import load_tokenizer

    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": f"{a}+{b}="}]))
               for a, b in held_out]
    right = 0
    for i in range(0, len(prompts), 50):
        out = generate(model, prompts[i: i + 50], max_new_tokens=40, stop_tokens=[tok.eos_id])
        for (a, b), tokens in zip(held_out[i: i + 50], out.tokens):
            right += final_answer(tok.decode(tokens, skip_special_tokens=True)) == str(a + b)
    return right / len(held_out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="SFT steps of the teacher and of each student")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.out or Path(tempfile.mkdtemp(prefix="distill-"))
    root.mkdir(parents=True, exist_ok=True)
    train, held_out = problems(args.train, 0), problems(200, 1)
    texts = [f"{a}+{b}=" + worked(a, b) for a, b in problems(3000, 2)]
    tok = train_tokenizer(texts, vocab_size=400, special_tokens=SPECIAL_TOKENS)
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in train]
    prompts = write_jsonl(root / "prompts.jsonl", rows)
    answers = write_jsonl(root / "answers.jsonl", [{**r, "completion": r["answer"]} for r in rows])
    solutions = write_jsonl(root / "solutions.jsonl", [{**r, "completion": worked(a, b)}
                                                         for r, (a, b) in zip(rows, train)])
    t0 = time.perf_counter()
    teacher_init = root / "teacher-init"
    if not teacher_init.is_dir():
        new_model(teacher_init, tok, LARGE, 0)
    teacher = fine_tune(teacher_init, solutions, root / "teacher", args.steps)
    print(f"teacher trained in {time.perf_counter() - t0:.0f} s; held-out accuracy {accuracy(teacher, held_out):.3f}",
          flush=True)
    t0 = time.perf_counter()
    stats = generate_traces(teacher, prompts, root / "traces.jsonl", batch_size=50, max_new_tokens=40,
                            temperature=0.7, reward="__main__:correct", seed=0, progress=False)
    kept = len((root / "traces.jsonl").read_text().splitlines())
    print(f"traces: {kept} of {len(rows)} kept ({stats.skipped_batches} batches from an earlier run) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    student_init = root / "student-init"
    if not student_init.is_dir():
        new_model(student_init, tok, SMALL, 1)
    results = {}
    traces = root / "traces.jsonl"
    for name, data, extra in (("bare answers", answers, ()), ("teacher traces", traces, ()),
                              ("teacher traces + logits", traces, (f"loss.teacher='{teacher}'",))):
        t0 = time.perf_counter()
        final = fine_tune(student_init, data, root / name.replace(" ", "-"), args.steps, *extra)
        results[name] = accuracy(final, held_out)
        print(f"student on {name}: held-out accuracy {results[name]:.3f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    print(json.dumps({"steps": args.steps, "train_problems": args.train, "kept_traces": kept,
                      **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
