"""GRPO step time: seekformer's GRPOTrainer vs TRL's GRPOTrainer on the same tiny V3-style model.

    python benchmarks/grpo.py [--steps 4 --prompts 4 --group 8 --tokens 32 --threads 1 --dtype bf16]

One model (transformers' DeepseekV3ForCausalLM, random weights, a byte-level tokenizer trained on
the arithmetic task) is saved in the hub layout; TRL trains it through transformers, seekformer
loads the same directory. Both run the same GRPO step: P prompts x G completions of at most T
tokens sampled at temperature 1, accuracy reward, group-normalised advantages, DAPO token-level
loss, beta = 0, one optimizer step per rollout (AdamW, lr 1e-6 so the policy barely moves). The steps
alternate in one process (a TRL step, then a seekformer step, ...): load on a shared machine hits
both alike. The first step of each is warmup and is not counted.

`--compare-plain-rows` times seekformer alone instead, its steps alternating between the update's
default shared-prompt passes (each prompt once per micro-batch, `training/grpo_prefix.py`) and the
plain right-padded rows, and prints the median over pairs of the update-time ratio.

Printed: median seconds per step and completion tokens per second (the random policy rarely stops
early, so both generate about P*G*T tokens), the median over steps of the per-step time ratio
(each TRL step against the seekformer step that followed it, so both saw about the same load), and
the breakdown: rollout (generation),
log-probs (seekformer: old/reference passes, none at mu = 1, beta = 0) and update. TRL's rollout
time is its calls to `model.generate`; the rest of its step is scoring, log-probs and the update.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import V3_STYLE, machine

from seekformer.tokenizer import SPECIAL_TOKENS, train_tokenizer
from seekformer.training.grpo import GRPOConfig, GRPOTrainer
from seekformer.training.rewards import accuracy
from seekformer.training.tasks import ArithmeticTask

TASK = {"min_digits": 2, "max_digits": 3, "ops": "+", "curriculum": False}


def build_model_dir(out: Path, layers: int, seed: int = 0) -> Path:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    task = ArithmeticTask(seed=seed, **TASK)
    texts = [t for e in task.train_batch(random.Random(seed), 2000) for t in (e.prompt, e.solution)]
    tokenizer = train_tokenizer(texts, vocab_size=320, special_tokens=(*SPECIAL_TOKENS, "<answer>", "</answer>"))
    config = {**V3_STYLE, "vocab_size": tokenizer.vocab_size, "num_hidden_layers": layers,
              "max_position_embeddings": 1024, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
              "pad_token_id": tokenizer.pad_id}
    torch.manual_seed(seed)
    DeepseekV3ForCausalLM(DeepseekV3Config(**config)).save_pretrained(out)
    tokenizer.save(out)
    return out


def seekformer_trainer(model_dir: Path, out: Path, args: argparse.Namespace, steps: int) -> GRPOTrainer:
    """seekformer's GRPOTrainer with the benchmark's settings."""
    cfg = GRPOConfig()
    cfg.apply_overrides([f"grpo.model='{model_dir}'", f"grpo.prompts_per_step={args.prompts}",
                         f"grpo.group_size={args.group}", f"grpo.max_new_tokens={args.tokens}",
                         f"grpo.micro_batch={args.prompts * args.group}", "optim.lr=1e-6",
                         f"run.steps={steps}", f"run.threads={args.threads}", f"run.dtype='{args.dtype}'",
                         "run.save_every=0", "grpo.epsilon_high=0.28"])
    cfg.rewards = {"accuracy": 1.0}
    cfg.task.options = dict(TASK)
    return GRPOTrainer(cfg, out, progress=False)


def compare_plain_rows(args: argparse.Namespace) -> None:
    """seekformer's update with shared-prompt passes against plain rows, alternating step by step."""
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp) / "model", args.layers)
        trainer = seekformer_trainer(model_dir, Path(tmp) / "ours", args, 2 * args.steps + 2)
        seconds: dict[bool, list[float]] = {True: [], False: []}
        for step in range(2 * args.steps + 2):
            trainer.shared_prefix = step % 2 == 0
            record = trainer.train_step()
            if step >= 2:  # one warmup step of each
                seconds[trainer.shared_prefix].append(record["update_seconds"])
    ratios = [plain / shared for shared, plain in zip(seconds[True], seconds[False])]
    print(f"GRPO update, {args.prompts} prompts x {args.group} completions of <= {args.tokens} tokens, "
          f"{args.layers}-layer V3-style model, {args.dtype}; {machine()}; {args.steps} pairs of steps")
    print(f"update s: shared prompts {statistics.median(seconds[True]):.3f}, plain rows "
          f"{statistics.median(seconds[False]):.3f}; plain / shared, median of pairs {statistics.median(ratios):.2f}x "
          f"({', '.join(f'{r:.2f}' for r in ratios)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed steps of each (after one warmup step)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="max completion length")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                        help="compute dtype of the update (each library's autocast); weights stay fp32")
    parser.add_argument("--compare-plain-rows", action="store_true",
                        help="seekformer only: shared-prompt update passes against plain rows, alternating")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.compare_plain_rows:
        compare_plain_rows(args)
        return

    from datasets import Dataset
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer as TRLTrainer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(tmp) / "model", args.layers)

        ours = seekformer_trainer(model_dir, Path(tmp) / "ours", args, args.steps + 1)

        task = ours.task
        n = args.prompts * (args.steps + 1)
        examples = task.train_batch(random.Random(1), n)
        chat = lambda e: ours.tokenizer.apply_chat_template([{"role": "user", "content": e.prompt}])  # noqa: E731
        dataset = Dataset.from_list([{"prompt": chat(e), "answer": e.answer} for e in examples])

        def reward(completions, answer, **_):
            return accuracy([c.replace("<|end_of_text|>", "") for c in completions], answer, check=task.check)

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        trl_args = TRLConfig(
            output_dir=str(Path(tmp) / "trl"), per_device_train_batch_size=args.prompts * args.group,
            num_generations=args.group, max_completion_length=args.tokens, max_steps=args.steps + 1,
            learning_rate=1e-6, beta=0.0, loss_type="dapo", temperature=1.0, epsilon_high=0.28,
            mask_truncated_completions=True, use_cpu=True, bf16=args.dtype == "bf16", report_to=[],
            logging_steps=1, save_strategy="no", dataloader_num_workers=0, shuffle_dataset=False,
            steps_per_generation=1, num_iterations=1, scale_rewards="group", disable_dropout=True,
            gradient_checkpointing=False)  # TRL enables it by default; seekformer does not checkpoint
        generate_seconds = []
        original_generate = DeepseekV3ForCausalLM.generate

        def timed_generate(self, *a, **k):
            start = time.perf_counter()
            try:
                return original_generate(self, *a, **k)
            finally:
                generate_seconds.append(time.perf_counter() - start)

        DeepseekV3ForCausalLM.generate = timed_generate
        timings = {"trl": [], "trl_rollout": [], "ours": [], "ours_rollout": [], "ours_logprobs": [],
                   "ours_update": [], "ours_tokens": [], "trl_tokens": []}

        class Alternate(TrainerCallback):
            def on_step_begin(self, a, state, control, **kw):
                generate_seconds.clear()
                self.start = time.perf_counter()

            def on_step_end(self, a, state, control, **kw):
                timings["trl"].append(time.perf_counter() - self.start)
                timings["trl_rollout"].append(sum(generate_seconds))
                record = ours.train_step()  # a seekformer step between two TRL steps
                timings["ours"].append(record["step_seconds"])
                timings["ours_rollout"].append(record["rollout_seconds"])
                timings["ours_logprobs"].append(record["logprob_seconds"])
                timings["ours_update"].append(record["update_seconds"])
                timings["ours_tokens"].append(record["completion_length"] * args.prompts * args.group)

            def on_log(self, a, state, control, logs=None, **kw):
                if logs and "completions/mean_length" in logs:
                    timings["trl_tokens"].append(logs["completions/mean_length"] * args.prompts * args.group)

        trainer = TRLTrainer(model=str(model_dir), reward_funcs=reward, args=trl_args, train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[Alternate()])
        trainer.train()
        DeepseekV3ForCausalLM.generate = original_generate

    med = {k: statistics.median(v[1:]) for k, v in timings.items() if len(v) > 1}
    ours_tps, trl_tps = med["ours_tokens"] / med["ours"], med["trl_tokens"] / med["trl"]

    def ratio(trl: list[float], ours: list[float]) -> float:
        """Median over the timed steps of TRL's time / seekformer's in the step that followed it."""
        return statistics.median(a / b for a, b in zip(trl[1:], ours[1:]))

    rest = lambda total, rollout: [a - b for a, b in zip(timings[total], timings[rollout])]  # noqa: E731
    print(f"GRPO step, {args.prompts} prompts x {args.group} completions of <= {args.tokens} tokens, "
          f"{args.layers}-layer V3-style model, {args.dtype}; {machine()}; median of {args.steps} steps")
    print(f"{'':12}{'s/step':>9}{'rollout':>9}{'logprobs':>9}{'update':>9}{'tokens':>8}{'tok/s':>8}")
    print(f"{'TRL':12}{med['trl']:9.2f}{med['trl_rollout']:9.2f}{'':>9}{med['trl'] - med['trl_rollout']:9.2f}"
          f"{med['trl_tokens']:8.0f}{trl_tps:8.0f}")
    print(f"{'seekformer':12}{med['ours']:9.2f}{med['ours_rollout']:9.2f}{med['ours_logprobs']:9.2f}"
          f"{med['ours_update']:9.2f}{med['ours_tokens']:8.0f}{ours_tps:8.0f}")
    print(f"seekformer / TRL, median of per-step ratios (each TRL step against the seekformer step right "
          f"after it): step time {ratio(timings['trl'], timings['ours']):.2f}x faster, rollout "
          f"{ratio(timings['trl_rollout'], timings['ours_rollout']):.2f}x, rest of the step "
          f"{ratio(rest('trl', 'trl_rollout'), rest('ours', 'ours_rollout')):.2f}x; completion tokens/s of the "
          f"medians {ours_tps / trl_tps:.2f}x")

if __name__ == "__main__":
    main()
