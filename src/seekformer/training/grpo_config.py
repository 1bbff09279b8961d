"""GRPO run configuration: a TOML file with `[grpo]`, `[task]`, `[rewards]`, `[optim]`, `[schedule]`
and `[run]` tables, plus `--set section.key=value` overrides; saved as `grpo_config.json` in the run.

    [grpo]
    model = "runs/sft/final"       # any directory load_model reads, with its tokenizer
    prompts_per_step = 8
    group_size = 8                 # G completions per prompt
    [task]
    name = "arithmetic"            # or countdown; or data = "prompts.jsonl"
    options = {max_digits = 2}
    [rewards]                      # name (built-in) or "module:function" = weight
    accuracy = 1.0
    format = 0.2

`[optim]`, `[schedule]` and `[run]` are those of `seekformer train` (run_config.py).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .grpo_loss import LOSS_TYPES, SCALES
from .run_config import (
    DTYPES,
    OptimSection,
    ParallelSection,
    RunConfigError,
    RunSection,
    ScheduleSection,
    _coerce,
    parse_value,
    tomllib,
)


@dataclass
class GRPOSection:
    model: str = ""  # the policy's starting weights (a model directory with its tokenizer)
    prompts_per_step: int = 8
    group_size: int = 8  # G
    max_new_tokens: int = 64  # longest completion; longer ones are truncated
    temperature: float = 1.0  # rollout sampling temperature; log-probs use the same scaled logits
    top_k: int = 0  # 0 = none (top-k / top-p change the sampled distribution: keep them off for exact ratios)
    iterations: int = 1  # mu: optimizer steps per rollout batch, reusing its log-probs
    micro_batch: int = 32  # sequences per forward/backward in the update
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo
    scale_rewards: str = "group"  # group | batch | none
    beta: float = 0.0  # KL coefficient; 0 = no reference model at all
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28  # DAPO's clip-higher
    mask_truncated: bool = True  # truncated completions get no loss (DAPO's overlong filtering)
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal (DAPO), refill from new prompts
    max_refill: int = 2  # dynamic sampling: rounds of new prompts drawn per step to refill dropped groups
    routing_replay: bool = False  # MoE: the update reuses the experts chosen for the rollout's tokens
    update_router_bias: bool = False  # MoE: keep updating the aux-loss-free bias during RL (frozen by default)
    bias_update_speed: float = 0.001  # gamma when update_router_bias
    eval_every: int = 0  # held-out evaluation every N steps (0 = only before and after)
    eval_size: int = 200  # held-out problems
    eval_batch: int = 64  # prompts per generate call in evaluation
    eval_temperature: float = 0.0  # 0 = greedy held-out accuracy; > 0: mean over eval_samples sampled completions
    eval_samples: int = 4


@dataclass
class TaskSection:
    name: str = "arithmetic"  # arithmetic | countdown (ignored when data is set)
    data: str = ""  # a JSONL file of {"prompt", "answer"} instead of a generated task
    options: dict = field(default_factory=dict)  # task options (max_digits, ops, n_numbers, eval_fraction ...)
    system: str = ""  # a system message placed before each prompt


SECTIONS: dict[str, type] = {"grpo": GRPOSection, "task": TaskSection, "optim": OptimSection,
                             "schedule": ScheduleSection, "run": RunSection,
                             "parallel": ParallelSection}  # torchrun jobs: data parallel only


def _defaults() -> dict[str, Any]:
    optim = OptimSection(lr=1e-5, weight_decay=0.0, min_lr_ratio=1.0)
    schedule = ScheduleSection(kind="constant", warmup_steps=0)
    run = RunSection(steps=100, log_every=1, eval_every=0, save_every=20)
    return {"optim": optim, "schedule": schedule, "run": run}


@dataclass
class GRPOConfig:
    grpo: GRPOSection = field(default_factory=GRPOSection)
    task: TaskSection = field(default_factory=TaskSection)
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})
    reward_options: dict = field(default_factory=dict)  # extra keyword arguments for every reward (overlong_buffer)
    optim: OptimSection = field(default_factory=lambda: _defaults()["optim"])
    schedule: ScheduleSection = field(default_factory=lambda: _defaults()["schedule"])
    run: RunSection = field(default_factory=lambda: _defaults()["run"])
    parallel: ParallelSection = field(default_factory=ParallelSection)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "GRPO config") -> GRPOConfig:
        cfg = cls()
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise RunConfigError(f"{source}: [{section}] must be a table of settings, got {values!r}")
            if section == "rewards":  # replaces the default rewards
                cfg.rewards = {}
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value, source)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> GRPOConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GRPO config {path} not found")
        try:
            raw = json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise RunConfigError(f"{path}: cannot parse ({exc})") from exc
        return cls.from_dict(raw, str(path))

    def set(self, key: str, value: Any, source: str = "--set") -> None:
        section, _, name = key.partition(".")
        if section in ("rewards", "reward_options") and name:
            if section == "rewards":
                value = _coerce(value, float, f"{source}: {key}")
            getattr(self, section)[name.strip('"')] = value
            return
        if section not in SECTIONS or not name:
            raise RunConfigError(f"{source}: unknown setting {key!r}; sections: {', '.join(SECTIONS)}, rewards, "
                                 "reward_options")
        target = getattr(self, section)
        hints = typing.get_type_hints(type(target))
        if name not in hints:
            raise RunConfigError(f"{source}: unknown setting {key!r}; [{section}] has: {', '.join(hints)}")
        setattr(target, name, _coerce(value, hints[name], f"{source}: {key}"))

    def apply_overrides(self, items: list[str]) -> None:
        for item in items:
            key, sep, text = item.partition("=")
            if not sep:
                raise RunConfigError(f"--set {item!r}: expected section.key=value")
            self.set(key.strip(), parse_value(text.strip()), f"--set {key.strip()}")
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise RunConfigError(f"invalid GRPO config: {msg}")

        g, r = self.grpo, self.run
        need(g.prompts_per_step >= 1, f"grpo.prompts_per_step must be >= 1, got {g.prompts_per_step}")
        need(g.group_size >= 2, f"grpo.group_size must be >= 2 (advantages compare completions of a prompt), "
             f"got {g.group_size}")
        need(g.max_new_tokens >= 1 and g.iterations >= 1 and g.micro_batch >= 1,
             "grpo.max_new_tokens, grpo.iterations and grpo.micro_batch must be >= 1")
        need(g.temperature > 0, f"grpo.temperature must be > 0 (log-probs are of the sampled distribution), "
             f"got {g.temperature}")
        need(g.top_k >= 0, f"grpo.top_k must be >= 0, got {g.top_k}")
        need(g.loss_type in LOSS_TYPES, f"grpo.loss_type must be one of {', '.join(LOSS_TYPES)}, got {g.loss_type!r}")
        need(g.scale_rewards in SCALES, f"grpo.scale_rewards must be one of {', '.join(SCALES)}, "
             f"got {g.scale_rewards!r}")
        need(g.beta >= 0 and g.epsilon_low >= 0 and g.epsilon_high >= 0,
             "grpo.beta, grpo.epsilon_low and grpo.epsilon_high must be >= 0")
        need(g.eval_every >= 0 and g.eval_size >= 1 and g.eval_batch >= 1 and g.max_refill >= 0 and g.eval_samples >= 1
             and g.eval_temperature >= 0, "grpo.eval_every, grpo.max_refill and grpo.eval_temperature must be >= 0, "
             "grpo.eval_size, grpo.eval_batch and grpo.eval_samples >= 1")
        need(bool(self.rewards), "[rewards] is empty: give at least one reward function and its weight")
        need(r.steps >= 1 and r.log_every >= 1 and r.keep_last >= 1 and r.save_every >= 0,
             "run.steps, run.log_every and run.keep_last must be >= 1, run.save_every >= 0")
        need(r.dtype in DTYPES, f"run.dtype must be one of {', '.join(DTYPES)}, got {r.dtype!r}")
        need(not r.activation_checkpointing, "run.activation_checkpointing is not supported by GRPO (pretraining "
             "only): its backward would recompute the routing without the routing replay")
        need(self.optim.lr > 0, f"optim.lr must be > 0, got {self.optim.lr}")
        p = self.parallel
        need(p.ep >= 1 and p.dp_shard >= 0 and p.timeout_s > 0,
             "parallel.ep must be >= 1, parallel.dp_shard >= 0, parallel.timeout_s > 0")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["rewards"] = dict(self.rewards)
        out["reward_options"] = dict(self.reward_options)
        return out

    def save(self, path: str | Path) -> Path:
        from ..io_utils import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
