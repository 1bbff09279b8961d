"""Rule-based rewards for GRPO (R1-Zero: accuracy + format) and user rewards by name.

A reward function takes the batch's completion texts and reference answers and returns one number
per completion:

    def my_reward(completions: list[str], answers: list, **info) -> list[float]

`info` holds `prompts` (texts), `completion_lengths` (tokens), `max_completion_length`,
`truncated` (bools) and `check` (the task's answer checker). Built-in rewards go by short names
(`accuracy`, `format`, `tag_count`, `overlong`); any other callable by `module:function`. A run
weights them: `{"accuracy": 1.0, "format": 0.2, "mypkg.rewards:brevity": 0.5}`.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

RewardFn = Callable[..., Sequence[float]]

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


class RewardError(ValueError):
    """A reward function that cannot be found, raised, or returned something other than numbers."""


def extract_answer(completion: str) -> str | None:
    """The text of the last `<answer>...</answer>` of a completion (stripped), or None."""
    found = _ANSWER.findall(completion)
    return found[-1].strip() if found else None


def _number(text: str) -> float | None:
    try:
        value = float(text.replace(",", "").replace(" ", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def answers_match(given: str, reference: Any) -> bool:
    """Exact match after stripping, or equal as numbers (`1,000` = `1000.0`, relative 1e-9)."""
    expected = str(reference).strip()
    if given == expected:
        return True
    a, b = _number(given), _number(expected)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# ---------------------------------------------------------------------------- built-in rewards
def accuracy(completions: Sequence[str], answers: Sequence[Any], *, check: Callable[[str, Any], bool] | None = None,
             **_) -> list[float]:
    """1 when the last `<answer>` holds the right answer (by the task's `check`, else `answers_match`), else 0."""
    check = check or answers_match
    out = []
    for completion, reference in zip(completions, answers):
        given = extract_answer(completion)
        out.append(1.0 if given is not None and check(given, reference) else 0.0)
    return out


def format_reward(completions: Sequence[str], answers: Sequence[Any] = (), **_) -> list[float]:
    """1 when the whole completion is `<think>...</think><answer>...</answer>` (whitespace around), else 0."""
    return [1.0 if _FORMAT.fullmatch(c) else 0.0 for c in completions]


def tag_count(completions: Sequence[str], answers: Sequence[Any] = (), **_) -> list[float]:
    """0.25 for each of the four tags that appears exactly once: repeating `<answer>` to try
    several answers, or dropping the reasoning, earns less (a guard against reward hacking)."""
    tags = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
    return [sum(0.25 for tag in tags if c.count(tag) == 1) for c in completions]


def overlong(completions: Sequence[str], answers: Sequence[Any] = (), *, completion_lengths: Sequence[int],
             max_completion_length: int, overlong_buffer: int | None = None, **_) -> list[float]:
    """DAPO's soft over-long penalty: 0 up to `max - buffer` tokens, then falling linearly to -1 at
    `max` (a truncated completion). `overlong_buffer` defaults to a quarter of the maximum."""
    buffer = overlong_buffer if overlong_buffer is not None else max(1, max_completion_length // 4)
    start = max_completion_length - buffer
    return [0.0 if n <= start else max(-1.0, (start - n) / buffer) for n in completion_lengths]


BUILTIN: dict[str, RewardFn] = {
    "accuracy": accuracy, "format": format_reward, "tag_count": tag_count, "overlong": overlong,
}


def resolve(name: str) -> RewardFn:
    """A built-in reward by name, or `module:function` imported."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise RewardError(f"unknown reward {name!r}: use a built-in ({', '.join(BUILTIN)}) or 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(f"reward {name!r}: cannot import module {module_name!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward {name!r}: module {module_name!r} has no callable {attr!r}")
    return fn


class Rewards:
    """Weighted reward functions: `score` returns each completion's total and each function's values."""

    def __init__(self, weights: Mapping[str, float]):
        if not weights:
            raise RewardError("no reward functions given")
        self.weights: dict[str, float] = {}
        self.fns: dict[str, RewardFn] = {}
        for name, weight in weights.items():
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                raise RewardError(f"reward {name!r}: weight must be a finite number, got {weight!r}")
            self.fns[name] = resolve(name)
            self.weights[name] = float(weight)

    def score(self, completions: Sequence[str], answers: Sequence[Any],
              **info) -> tuple[list[float], dict[str, list[float]]]:
        per_fn: dict[str, list[float]] = {}
        n = len(completions)
        for name, fn in self.fns.items():
            try:
                values = fn(list(completions), list(answers), **info)
            except Exception as exc:
                raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc
            try:
                values = list(values)
            except TypeError:
                raise RewardError(f"reward {name!r} must return a sequence of numbers, got "
                                  f"{type(values).__name__}") from None
            if len(values) != n:
                raise RewardError(f"reward {name!r} returned {len(values)} values for {n} completions")
            for i, v in enumerate(values):
                if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
                    v = v.item()  # numpy / torch scalars
                if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                    raise RewardError(f"reward {name!r} returned {v!r} for completion {i}: expected a finite number")
                values[i] = float(v)
            per_fn[name] = values
        total = [sum(self.weights[name] * per_fn[name][i] for name in self.fns) for i in range(n)]
        return total, per_fn
