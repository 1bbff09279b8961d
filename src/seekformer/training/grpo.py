"""GRPO (DeepSeekMath, R1): group-relative policy optimisation with rule-based rewards.

One step: P prompts from the task, G completions each sampled from the current policy with
seekformer's batched `generate` (latent cache, absorbed MLA) at `temperature`; rewards; advantages
normalised within each group; then `iterations` (mu) optimizer steps over that batch. The update's
per-token log-probs come from a forward that runs each prompt once per micro-batch, its completions
attending to it (`grpo_prefix.py`), and the chunked output head (`token_logprobs`, never
[tokens, vocab] logits) at the same temperature, so they are the log-probs of the distribution that
was sampled.
With mu > 1 the log-probs of the policy that sampled (pi_old) are computed once, before the first
update, and reused; beta = 0 never builds a reference model.

MoE: the auxiliary-loss-free bias is frozen unless `update_router_bias`; `routing_replay` records
the experts pi_old chose for every rollout token (in the pass that computes the old log-probs) and
makes the updates use them, so the ratio compares one sub-network; `router_drift` logs the share of
the update's own expert choices that differ from pi_old's.

Every seed that steers a step (the task's draw, the sampler's) is derived from the run seed and
the step, and checkpoints hold weights, optimizer, torch RNG and the curriculum: a resumed run
repeats the uninterrupted one.

Under torchrun, `seekformer.distributed.post_training.DistributedGRPOTrainer` runs this loop data
parallel through the hooks in "where a data-parallel subclass differs".
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..inference import generate
from ..model.moe import RouterOutput
from ..model.packed_weights import refresh_and_pack
from ..model.transformer import Transformer
from ..runtime import resolve_device, set_cpu_threads
from .balance import add_loads, moe_layers, update_bias
from .checkpointing import latest_checkpoint, load_checkpoint, publish_dir, save_checkpoint, write_model_dir
from .cross_entropy import token_logprobs
from .grpo_config import GRPOConfig
from .grpo_loss import LOSS_TYPES, SCALES, group_advantages, grpo_loss, grpo_loss_stats, per_token_kl
from .grpo_prefix import PrefixBatch, completion_targets, prefix_logprobs, supports_shared_prefix
from .metrics import MetricsLog
from .optim import build_optimizer, lr_factor, set_lr
from .post_training_hooks import OneProcessHooks
from .rewards import Rewards, accuracy, format_reward
from .sft import load_model_and_tokenizer
from .tasks import Example, Task, build_task

__all__ = ["LOSS_TYPES", "SCALES", "GRPOConfig", "GRPOResult", "GRPOTrainer", "group_advantages", "grpo_loss",
           "grpo_loss_stats", "per_token_kl", "train_grpo"]

CONFIG_FILE = "grpo_config.json"
FINAL = "final"


@dataclass
class Rollout:
    """P prompts x G completions, rows grouped by prompt."""

    examples: list[Example]  # one per row
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # the stop token included when there is one
    texts: list[str]  # completions decoded, without the stop token
    truncated: list[bool]
    rewards: torch.Tensor  # [B] weighted total
    per_fn: dict[str, list[float]]
    correct: list[float]  # the task's accuracy per row (whatever the reward weights)

    def select(self, rows: list[int]) -> Rollout:
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return Rollout(pick(self.examples), pick(self.prompt_ids), pick(self.completion_ids), pick(self.texts),
                       pick(self.truncated), self.rewards[rows], {k: pick(v) for k, v in self.per_fn.items()},
                       pick(self.correct))

    @staticmethod
    def concat(parts: list[Rollout]) -> Rollout:
        join = lambda name: [x for p in parts for x in getattr(p, name)]  # noqa: E731
        return Rollout(join("examples"), join("prompt_ids"), join("completion_ids"), join("texts"), join("truncated"),
                       torch.cat([p.rewards for p in parts]),
                       {k: [x for p in parts for x in p.per_fn[k]] for k in parts[0].per_fn}, join("correct"))


@dataclass
class GRPOResult:
    run_dir: Path
    step: int
    final_dir: Path
    checkpoint: Path
    eval_before: dict[str, Any] = field(default_factory=dict)
    eval_after: dict[str, Any] = field(default_factory=dict)
    stopped_by_time: bool = False


class GRPOTrainer(OneProcessHooks):
    """`GRPOTrainer(cfg, run_dir)` starts a run from `cfg.grpo.model`; `GRPOTrainer.resume(run_dir)`
    continues one from its latest checkpoint."""

    # a data-parallel subclass (seekformer.distributed.post_training) sets these before __init__
    rank, world_size, is_main = 0, 1, True

    def __init__(self, cfg: GRPOConfig, run_dir: str | Path, progress: bool | None = None,
                 echo: Callable[[str], None] | None = None, _resuming: bool = False):
        self.run_dir = Path(run_dir)
        if not _resuming and self.is_main and (self.run_dir / CONFIG_FILE).exists():
            raise ValueError(f"{self.run_dir} already holds a GRPO run; continue it with --resume {self.run_dir} "
                             "or choose another output directory")
        if not cfg.grpo.model:
            raise ValueError("no policy model: set grpo.model (--model DIR) to a model directory")
        cfg.grpo.model = str(Path(cfg.grpo.model).resolve())
        if cfg.task.data:
            cfg.task.data = str(Path(cfg.task.data).resolve())
        self.cfg = cfg
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.echo = echo or (lambda msg: print(msg, file=sys.stderr))
        g = cfg.grpo
        self.device = resolve_device(cfg.run.device)
        if self.device.type == "cpu":
            set_cpu_threads(cfg.run.threads, self.echo)
        self.amp_dtype = torch.bfloat16 if cfg.run.dtype == "bf16" else None
        self.model, self.tokenizer = load_model_and_tokenizer(g.model, device=self.device)
        self.model.train()
        # bf16 runs sample from a bf16 copy of the policy (bf16 matmuls are ~2.7x fp32 on CPU and no
        # weight is cast per decode step), refreshed from the fp32 weights before every rollout; so do
        # data-parallel runs (in the run's dtype), whose policy is sharded
        self.rollout_model = copy.deepcopy(self.model).to(self.amp_dtype or torch.float32).eval() \
            .requires_grad_(False) if self.amp_dtype is not None or self.world_size > 1 else self.model
        self.model = self.parallelize(self.model)
        self.ref_model = None  # beta = 0: no reference model at all
        if g.beta > 0:
            self.ref_model = Transformer.from_pretrained(g.model, device=self.device).eval().requires_grad_(False)
        self.moes = moe_layers(self.model)
        self.shared_prefix = supports_shared_prefix(self.model)  # each prompt once per micro-batch
        self.task: Task = build_task(None if cfg.task.data else cfg.task.name, cfg.task.data or None,
                                     seed=cfg.run.seed, **self._task_options())
        self.rewards = Rewards(cfg.rewards)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.step = 0
        self.log = MetricsLog(self.run_dir)
        self.eval_before: dict[str, Any] = {}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not _resuming and self.is_main:
            cfg.save(self.run_dir / CONFIG_FILE)
            self.log.path.unlink(missing_ok=True)

    def _task_options(self) -> dict[str, Any]:
        options = dict(self.cfg.task.options)
        if not self.cfg.task.data:
            options.setdefault("eval_size", self.cfg.grpo.eval_size)
        return options

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: list[str] | None = None, **kwargs) -> GRPOTrainer:
        """Continue the run in `run_dir` from its latest checkpoint (only `run.*` and `parallel.*` may change)."""
        run_dir = Path(run_dir)
        if not (run_dir / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{run_dir} holds no GRPO run to resume (no {CONFIG_FILE})")
        cfg = GRPOConfig.load(run_dir / CONFIG_FILE)
        bad = [o for o in overrides or [] if not o.strip().startswith(("run.", "parallel."))]
        if bad:
            raise ValueError(f"only run.* and parallel.* settings can change when resuming; not {', '.join(bad)}")
        cfg.apply_overrides(overrides or [])
        trainer = cls(cfg, run_dir, _resuming=True, **kwargs)
        if trainer.is_main:
            cfg.save(run_dir / CONFIG_FILE)
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            trainer.log.truncate_after(-1)
            return trainer
        trainer.restore(checkpoint)
        trainer.log.truncate_after(trainer.step)
        trainer.echo(f"resuming {run_dir} from {checkpoint.name} (step {trainer.step})")
        return trainer

    def restore(self, checkpoint: Path) -> None:
        """Load weights, optimizer, step, curriculum and the evaluation before training from `checkpoint`."""
        state = load_checkpoint(checkpoint, self.model, self.optimizer)
        if self.device.type == "cpu" and not self.cfg.run.threads:
            torch.set_num_threads(int(state["threads"]))  # the same numerics as before the interruption
        self._continue_from(checkpoint, state)

    def _continue_from(self, checkpoint: Path, state: dict[str, Any]) -> None:
        del checkpoint
        self.step = int(state["step"])
        self.task.load_state_dict(state["task"])
        self.eval_before = state.get("eval_before", {})

    # ------------------------------------------------------------------ where a data-parallel subclass differs
    def local_prompts(self, examples: list[Example]) -> list[Example]:
        """This rank's share of the step's prompts (one process: all)."""
        return examples

    def rollout_seed(self, seed: int) -> int:
        """This rank's sampling seed for a rollout seeded `seed` (one process: `seed`)."""
        return seed

    def gather_rollout(self, r: Rollout) -> Rollout:
        """The rollouts of all ranks, in rank order (one process: `r`)."""
        return r

    def gather_rows(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """All ranks' rows of `t` in rank order, and the index of this rank's first row (one process: t, 0)."""
        return t, 0

    def merge_over_ranks(self, parts: dict) -> dict:
        """The union of every rank's `parts` (one process: `parts`)."""
        return parts

    def eval_model(self) -> Transformer:
        """The float32 policy that held-out evaluation generates with."""
        return self.model

    # ------------------------------------------------------------------ pieces
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prompt_ids(self, examples: list[Example]) -> list[list[int]]:
        """Each prompt in the tokenizer's chat format, ready for the assistant's turn."""
        out = []
        limit = self.model.config.max_position_embeddings
        for example in examples:
            messages = ([{"role": "system", "content": self.cfg.task.system}] if self.cfg.task.system else []) + \
                [{"role": "user", "content": example.prompt}]
            ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(messages))
            if len(ids) >= limit:
                raise ValueError(f"prompt {example.prompt[:60]!r} is {len(ids)} tokens long, more than the model's "
                                 f"context leaves room for (max_position_embeddings={limit})")
            out.append(ids)
        return out

    @torch.no_grad()
    def _sync_rollout_model(self) -> None:
        """Copy the current weights (and buffers: the router bias) into the bf16 rollout copy, and
        pack its weights for the bf16 decode products on CPU (`refresh_and_pack`)."""
        if self.rollout_model is self.model:
            return
        refresh_and_pack(self.rollout_model, self.model.state_dict())

    def _seed(self, step: int, round_: int) -> int:
        return (self.cfg.run.seed * 1_000_003 + step * 1009 + round_) % (2 ** 62)

    def rollout(self, examples: list[Example], seed: int) -> Rollout:
        """G completions for each example, scored."""
        g = self.cfg.grpo
        prompts = self.prompt_ids(examples)
        rows = [ids for ids in prompts for _ in range(g.group_size)]
        row_examples = [e for e in examples for _ in range(g.group_size)]
        eos = self.tokenizer.eos_id
        with torch.no_grad():
            self._sync_rollout_model()
            out = generate(self.rollout_model, rows, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                           top_k=g.top_k or None, seed=seed, stop_tokens=[eos])
        completions = out.tokens
        truncated = [reason == "length" for reason in out.finish_reasons]
        texts = [self.tokenizer.decode(c[:-1] if c and c[-1] == eos else c) for c in completions]
        answers = [e.answer for e in row_examples]
        info = dict(prompts=[e.prompt for e in row_examples], completion_lengths=[len(c) for c in completions],
                    max_completion_length=g.max_new_tokens, truncated=truncated, check=self.task.check,
                    **self.cfg.reward_options)
        total, per_fn = self.rewards.score(texts, answers, **info)
        correct = accuracy(texts, answers, check=self.task.check)
        return Rollout(row_examples, rows, completions, texts, truncated, torch.tensor(total), per_fn, correct)

    def _inputs(self, r: Rollout, s: slice, width: int) -> PrefixBatch | tuple[torch.Tensor, ...]:
        """What `_logprobs` runs for rows `s` with targets `width` wide: a `PrefixBatch` (each prompt
        once, `grpo_prefix.py`), or, for models it cannot run (Engram, attention dropout) and empty
        micro-batches, the rows themselves (`_rows`)."""
        if self.shared_prefix and s.stop > s.start:
            return PrefixBatch.build(r.prompt_ids[s], r.completion_ids[s], self.device, width)
        return self._rows(r.prompt_ids[s], r.completion_ids[s], width)

    def _rows(self, prompts: list[list[int]], completions: list[list[int]], width: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids [B, L]: each row's prompt + completion from position 0, padded on the right;
        completion targets [B, width] (-100 on padding); and the position [B, width] of the hidden
        state that predicts each target. Padding only after a row's tokens needs no attention mask: a
        causal model never lets a real token see a later one, so the update runs plain causal
        attention (the blocked kernel on CPU, where a padding mask would force SDPA's masked
        path), and positions count from 0 as in the rollout's left-padded prompts."""
        B = len(prompts)
        L = max((len(p) + len(c) for p, c in zip(prompts, completions)), default=1)
        ids = torch.full((B, L), self.tokenizer.pad_id, dtype=torch.long)
        starts = torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        positions = (starts.unsqueeze(1) + torch.arange(width)).clamp(max=L - 1)  # past a row's end: ignored
        return ids.to(self.device), completion_targets(completions, width, self.device), positions.to(self.device)

    def _logprobs(self, model, inputs: PrefixBatch | tuple[torch.Tensor, ...], entropy: bool = False,
                  routes: dict[str, RouterOutput] | None = None):
        """Per-token log-probs of the targets of `inputs` (`_inputs`), and entropies; `routes`
        collects each MoE layer's routing."""
        temperature = self.cfg.grpo.temperature
        with self._autocast():
            if isinstance(inputs, PrefixBatch):
                return prefix_logprobs(model, inputs, temperature, entropy=entropy, routes=routes)
            ids, targets, positions = inputs
            h = model.hidden_states(ids, routes=routes)
            h = h.gather(1, positions.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            return token_logprobs(h, model.lm_head.weight, targets, temperature, entropy=entropy)

    def _chunks(self, B: int) -> list[slice]:
        size = self.cfg.grpo.micro_batch
        return [slice(i, min(i + size, B)) for i in range(0, B, size)]

    def _collect_rollouts(self) -> tuple[Rollout, Rollout, dict[str, float]]:
        """This step's rollout; with dynamic sampling, groups of equal rewards are dropped and
        refilled from new prompts (at most `max_refill` rounds)."""
        g = self.cfg.grpo
        parts, kept, n_groups, n_flat = [], [], 0, 0
        first_round = (0, 1)  # (groups of equal rewards, groups) in round 0
        for round_ in range(1 + (g.max_refill if g.dynamic_sampling else 0)):
            need = (g.prompts_per_step if round_ == 0 else g.prompts_per_step // self.world_size) \
                - sum(len(k.examples) for k in kept) // g.group_size
            if need <= 0:
                break
            if round_ == 0:  # the step's prompts, of which this rank rolls out its share
                examples = self.local_prompts(self.task.train_batch(random.Random(self._seed(self.step, 0)),
                                                                    need))
            else:  # refills: each rank draws its own
                examples = self.task.train_batch(random.Random(self.rollout_seed(self._seed(self.step, round_))),
                                                 need)
            r = self.rollout(examples, self.rollout_seed(self._seed(self.step, round_)))
            parts.append(r)
            flat = (r.rewards.view(-1, g.group_size).std(dim=1) == 0).tolist()
            if round_ == 0:
                first_round = (sum(flat), len(flat))
            n_groups += len(flat)
            n_flat += sum(flat)
            if g.dynamic_sampling:
                rows = [i for i in range(len(r.examples)) if not flat[i // g.group_size]]
                if rows:
                    kept.append(r.select(rows))
            else:
                kept.append(r)
        counts = self.reduce_sums({k: torch.tensor(v, dtype=torch.float64) for k, v in
                                   (("first_flat", first_round[0]), ("first", first_round[1]), ("groups", n_groups),
                                    ("flat", n_flat))})
        info = {"frac_zero_std": float(counts["first_flat"] / counts["first"]), "groups_sampled": int(counts["groups"]),
                "groups_dropped": int(counts["flat"]) if g.dynamic_sampling else 0}
        everything = Rollout.concat(parts)
        return (Rollout.concat(kept) if kept else everything.select([])), everything, info

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, Any]:
        cfg, g = self.cfg, self.cfg.grpo
        started = time.perf_counter()
        batch, everything, info = self._collect_rollouts()
        everything = self.gather_rollout(everything)  # metrics and the curriculum see the global batch
        rollout_seconds = time.perf_counter() - started
        record: dict[str, Any] = {"kind": "train", "step": self.step + 1, **self._rollout_metrics(everything), **info}
        self.task.update(sum(everything.correct) / len(everything.correct))
        record["level"] = getattr(self.task, "level", None)
        B = len(batch.examples)  # this rank's rows; `B_all` all ranks'
        timings = {"rollout_seconds": rollout_seconds, "logprob_seconds": 0.0, "update_seconds": 0.0}
        all_rewards, first_row = self.gather_rows(batch.rewards)
        B_all = len(all_rewards)
        if B_all == 0:  # every group had equal rewards: nothing to learn from
            self.step += 1
            record.update(timings, skipped=True, step_seconds=time.perf_counter() - started)
            return record
        advantages = group_advantages(all_rewards, g.group_size, g.scale_rewards)[first_row:first_row + B] \
            .to(self.device) if B else torch.zeros(0, device=self.device)
        targets = completion_targets(batch.completion_ids, device=self.device)
        real = targets != -100
        truncated = torch.tensor(batch.truncated, device=self.device).unsqueeze(1)
        loss_mask = real & ~truncated if g.mask_truncated else real
        chunks = self._chunks(B)
        inputs = [self._inputs(batch, s, targets.shape[1]) for s in chunks]

        t0 = time.perf_counter()
        need_old = g.iterations > 1 or g.routing_replay
        old_lp, ref_lp, routes = None, None, []
        with torch.no_grad():
            if need_old:
                old_lp = torch.empty(targets.shape, device=self.device)
                for s, x in zip(chunks, inputs):
                    chunk_routes: dict[str, RouterOutput] = {}
                    old_lp[s] = self._logprobs(self.model, x, routes=chunk_routes)
                    routes.append({name: route.indices for name, route in chunk_routes.items()})
            if self.ref_model is not None:
                ref_lp = torch.cat([self._logprobs(self.ref_model, x) for x in inputs])
        timings["logprob_seconds"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        totals = self.reduce_sums({"active": loss_mask.sum(), "real": real.sum(),
                                   "chunks": torch.tensor(sum(s.stop > s.start for s in chunks))})
        n_active, n_chunks = float(totals["active"]), int(totals["chunks"])
        sums: dict[str, float] = {}
        drift, drift_n = 0.0, 0
        for iteration in range(g.iterations):
            lr = cfg.optim.lr * lr_factor(self.step, cfg.run.steps, cfg.schedule, cfg.optim.min_lr_ratio)
            set_lr(self.optimizer, lr)
            loss_total = 0.0
            loads: dict[str, torch.Tensor] = {}  # the update's expert loads (not the log-prob pass's)
            for k, (s, x) in enumerate(zip(chunks, inputs)):
                first = iteration == 0
                chunk_routes = {}
                with self._replay(routes[k] if g.routing_replay else None):
                    lp, ent = self._logprobs(self.model, x, entropy=True, routes=chunk_routes)
                loads = add_loads(loads, {name: route.counts for name, route in chunk_routes.items()})
                if routes and first:
                    d, n = _drift(self.moes, chunk_routes, routes[k])
                    drift, drift_n = drift + d, drift_n + n
                old = old_lp[s] if old_lp is not None else lp.detach()
                ref = ref_lp[s] if ref_lp is not None else None
                if s.stop > s.start:
                    loss = grpo_loss(lp, old, advantages[s], loss_mask[s], ref_logprobs=ref, beta=g.beta,
                                     epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high, loss_type=g.loss_type,
                                     normalizer=self._normalizer(n_active, B_all))
                    loss = loss * self._chunk_weight(s, B_all, n_chunks)
                else:  # a rank with fewer micro-batches than another still runs FSDP's collectives
                    loss = lp.sum()
                # data parallel: the ranks' gradients are averaged, so each rank's share is scaled by their number
                (loss * self.world_size).backward()
                loss_total += loss.item()
                tokens = float(loss_mask[s].sum())
                stats = grpo_loss_stats(lp.detach(), old, advantages[s], loss_mask[s], ref_logprobs=ref,
                                        epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high)
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value * tokens
                if first:
                    sums["entropy"] = sums.get("entropy", 0.0) + float((ent * real[s]).sum())
            grad_norm = self.clip_gradients(cfg.optim.grad_clip or math.inf)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            loads = self.reduce_sums(loads)
            if g.update_router_bias and g.bias_update_speed > 0:
                for name, counts in loads.items():  # layers that ran (an unused one would not move)
                    if self.moes[name].gate.e_score_correction_bias is not None:
                        update_bias(self.moes[name], counts, g.bias_update_speed)
        timings["update_seconds"] = time.perf_counter() - t0
        self.step += 1
        sums = {k: float(v) for k, v in self.reduce_sums({k: torch.tensor(v, dtype=torch.float64) for k, v in
                                                          {**sums, "loss": loss_total, "drift": drift,
                                                           "drift_n": drift_n}.items()}).items()}
        loss_total, drift, drift_n = sums.pop("loss"), sums.pop("drift"), sums.pop("drift_n")
        denominator = max(n_active, 1.0) * g.iterations
        record.update({key: value / denominator for key, value in sums.items() if key != "entropy"})
        record["entropy"] = sums["entropy"] / max(float(totals["real"]), 1.0)
        if drift_n:
            record["router_drift"] = drift / drift_n
        step_seconds = time.perf_counter() - started
        generated = sum(len(c) for c in everything.completion_ids)
        record.update(loss=loss_total, lr=lr, grad_norm=float(grad_norm), trained_rows=B_all, **timings,
                      step_seconds=step_seconds, tokens_per_s=generated / step_seconds,
                      rollout_tokens_per_s=generated / max(rollout_seconds, 1e-9))
        return record

    def _normalizer(self, n_active: float, B: int) -> float | None:
        g = self.cfg.grpo
        if g.loss_type == "dapo":
            return max(n_active, 1.0)
        if g.loss_type == "dr_grpo":
            return float(B * g.max_new_tokens)
        return None

    def _chunk_weight(self, s: slice, B: int, n_chunks: int) -> float:
        loss_type = self.cfg.grpo.loss_type
        if loss_type == "grpo":
            return (s.stop - s.start) / B  # a mean over sequences, split over chunks
        if loss_type == "bnpo":
            return 1.0 / n_chunks  # the mean of each micro-batch's token mean, as TRL accumulates it
        return 1.0

    @contextlib.contextmanager
    def _replay(self, indices: dict[str, torch.Tensor] | None):
        if indices is not None:
            for name, moe in self.moes.items():
                moe.replay_indices = indices[name]
        try:
            yield
        finally:
            for moe in self.moes.values():
                moe.replay_indices = None

    def _rollout_metrics(self, r: Rollout) -> dict[str, Any]:
        rewards = r.rewards
        out: dict[str, Any] = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rewards) > 1
                               else 0.0, "accuracy": sum(r.correct) / len(r.correct)}
        for name, values in r.per_fn.items():
            t = torch.tensor(values)
            out[f"reward_{name}"] = float(t.mean())
            out[f"reward_{name}_std"] = float(t.std()) if len(t) > 1 else 0.0
        lengths = [len(c) for c in r.completion_ids]
        out["completion_length"] = sum(lengths) / len(lengths)
        out["truncated"] = sum(r.truncated) / len(r.truncated)
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, examples: list[Example] | None = None) -> dict[str, float]:
        """Held-out accuracy and format rate: greedy, or the mean over `eval_samples` completions per
        problem sampled at `eval_temperature` (the same seed at every evaluation)."""
        examples = self.task.eval_set() if examples is None else examples
        if not examples:
            return {}
        g = self.cfg.grpo
        eos = self.tokenizer.eos_id
        samples = g.eval_samples if g.eval_temperature > 0 else 1
        examples = [e for e in examples for _ in range(samples)]
        model = self.eval_model()
        done: dict[int, list[str]] = {}
        # data parallel: rank r generates batches r, r + world, ... (the batches and seeds of one process)
        batches = list(enumerate(range(0, len(examples), g.eval_batch)))[self.rank::self.world_size]
        for k, start in batches:
            part = examples[start:start + g.eval_batch]
            out = generate(model, self.prompt_ids(part), max_new_tokens=g.max_new_tokens,
                           temperature=g.eval_temperature, seed=self._seed(-1, k), stop_tokens=[eos])
            done[k] = [self.tokenizer.decode(c[:-1] if c and c[-1] == eos else c) for c in out.tokens]
        texts = [t for _, part in sorted(self.merge_over_ranks(done).items()) for t in part]
        answers = [e.answer for e in examples]
        correct = accuracy(texts, answers, check=self.task.check)
        return {"eval_accuracy": sum(correct) / len(correct),
                "eval_format": sum(format_reward(texts)) / len(texts), "eval_problems": len(examples) // samples}

    def _log_eval(self) -> dict[str, Any]:
        metrics = self.evaluate()
        if metrics:
            self.log.write({"kind": "eval", "step": self.step, **metrics})
            self.echo(f"step {self.step}: held-out accuracy {metrics['eval_accuracy']:.3f} "
                      f"(format {metrics['eval_format']:.3f}, {metrics['eval_problems']} problems)")
        return metrics

    # ------------------------------------------------------------------ the loop
    def train(self) -> GRPOResult:
        cfg, run = self.cfg, self.cfg.run
        deadline = time.perf_counter() + run.max_minutes * 60 if run.max_minutes > 0 else math.inf
        if self.step == 0:
            self.eval_before = self._log_eval()
        stopped_by_time = False
        bar = tqdm(total=run.steps, initial=self.step, unit="step", disable=not self.progress, dynamic_ncols=True)
        try:
            while self.step < run.steps:
                if self.out_of_time(deadline):
                    stopped_by_time = True
                    break
                record = self.train_step()
                self.log.write(record)
                bar.update(1)
                if self.step % run.log_every == 0:
                    msg = (f"reward {record['reward']:.3f} acc {record['accuracy']:.3f} "
                           f"len {record['completion_length']:.1f}")
                    if bar.disable:
                        of = f"/{run.steps}" if run.max_minutes <= 0 else ""  # a time budget ends the run
                        self.echo(f"step {self.step}{of} {msg} ({record['step_seconds']:.1f} s)")
                    else:
                        bar.set_postfix_str(msg, refresh=False)
                if cfg.grpo.eval_every and self.step % cfg.grpo.eval_every == 0 and self.step < run.steps:
                    self._log_eval()
                if run.save_every and self.step % run.save_every == 0 and self.step < run.steps:
                    self.save()
        finally:
            bar.close()
        after = self._log_eval()
        checkpoint = self.save()
        final = self.save_final()
        return GRPOResult(self.run_dir, self.step, final, checkpoint, self.eval_before, after, stopped_by_time)

    def save(self) -> Path:
        state = {"step": self.step, "task": self.task.state_dict(), "threads": torch.get_num_threads(),
                 "eval_before": self.eval_before}
        return save_checkpoint(self.run_dir, self.model, self.optimizer, state, self.tokenizer, self.cfg.run.keep_last)

    def save_final(self) -> Path:
        final = self.run_dir / FINAL
        tmp = self.run_dir / f".tmp-{FINAL}-{os.getpid()}"
        write_model_dir(self.model, self.tokenizer, tmp)
        publish_dir(tmp, final)
        return final


def _drift(moes: dict, routes: dict[str, RouterOutput], recorded: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(expert slots the router now chooses that pi_old did not, all slots), summed over MoE layers.
    `routes` is this forward's routing (the replayed one under routing replay: the router's own choice
    is selected again from its scores)."""
    changed, total = 0.0, 0
    for name, moe in moes.items():
        now = moe.gate.select(routes[name].scores)
        before = recorded[name]
        n_experts = moe.gate.n_experts
        a = torch.zeros(now.shape[0], n_experts, dtype=torch.bool, device=now.device).scatter_(1, now, True)
        b = torch.zeros_like(a).scatter_(1, before, True)
        changed += float((a & ~b).sum())
        total += now.numel()
    return changed, total


def train_grpo(cfg: GRPOConfig, run_dir: str | Path, **kwargs) -> GRPOResult:
    """Run GRPO from Python: `train_grpo(cfg, "runs/rl")`."""
    return GRPOTrainer(cfg, run_dir, **kwargs).train()
