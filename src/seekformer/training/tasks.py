"""Tasks for GRPO with checkable answers: generated locally (seeded, with a held-out split) or read
from a JSONL file.

- `arithmetic`: a op b with a difficulty curriculum (the operands' digit count grows as the policy
  gets the current level right);
- `countdown`: reach a target with the given numbers (each once, + - * /, parentheses); every
  target is built from its numbers, so each problem has a solution, which is checked;
- `jsonl`: `{"prompt": ..., "answer": ...}` per line.

A task gives `Example`s (prompt text, reference answer, and a worked solution in the R1 format
`<think>...</think><answer>...</answer>` when one is known, for an SFT warm-up), checks a given
answer (`check`), and keeps the held-out problems out of training (`eval_set`, `train_batch`).
"""

from __future__ import annotations

import ast
import json
import operator
import random
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from .rewards import answers_match

TASKS = ("arithmetic", "countdown")


@dataclass(frozen=True)
class Example:
    prompt: str  # the user's question
    answer: Any  # reference the task's `check` compares with (a string, or the countdown problem)
    solution: str = ""  # a worked completion `<think>...</think><answer>...</answer>`, "" when unknown

    @property
    def key(self) -> str:
        return self.prompt


def r1_completion(think: str, answer: str) -> str:
    return f"<think>{think}</think><answer>{answer}</answer>"


class Task:
    """Base: a seeded held-out split, training batches that never contain a held-out prompt."""

    name = "task"

    def __init__(self, seed: int = 0, eval_size: int = 200) -> None:
        self.seed, self.eval_size = seed, eval_size
        self._eval: list[Example] | None = None

    def generate(self, rng: random.Random) -> Example:  # one problem at the current difficulty
        raise NotImplementedError

    def check(self, given: str, reference: Any) -> bool:
        return answers_match(given, reference)

    def eval_set(self) -> list[Example]:
        """The held-out problems (the same for a given seed), distinct from each other."""
        if self._eval is None:
            rng = random.Random(f"{self.name}-eval-{self.seed}")
            seen: dict[str, Example] = {}
            for _ in range(self.eval_size * 50):
                if len(seen) == self.eval_size:
                    break
                example = self.generate_eval(rng)
                seen.setdefault(example.key, example)
            self._eval = list(seen.values())
        return self._eval

    def generate_eval(self, rng: random.Random) -> Example:
        return self.generate(rng)

    def train_batch(self, rng: random.Random, n: int) -> list[Example]:
        """`n` training problems drawn with `rng` (the run's task RNG, saved in its checkpoints)."""
        held_out = {e.key for e in self.eval_set()}
        out: list[Example] = []
        for _ in range(n * 100):
            if len(out) == n:
                return out
            example = self.generate(rng)
            if example.key not in held_out:
                out.append(example)
        raise ValueError(f"task {self.name}: could not draw {n} training problems outside the held-out split "
                         "(the problem space is too small: raise the difficulty or lower eval_size)")

    # curriculum hooks (no curriculum by default); the state goes into checkpoints
    def update(self, accuracy: float) -> None:
        del accuracy

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


# ---------------------------------------------------------------------------- arithmetic
_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@dataclass
class Curriculum:
    """Level = the largest operand digit count; promoted when the mean training accuracy of the
    last `window` steps reaches `threshold`."""

    level: int
    max_level: int
    threshold: float = 0.8
    window: int = 5
    recent: list[float] = field(default_factory=list)

    def update(self, accuracy: float) -> None:
        self.recent = (self.recent + [accuracy])[-self.window:]
        if len(self.recent) == self.window and sum(self.recent) / self.window >= self.threshold \
                and self.level < self.max_level:
            self.level += 1
            self.recent = []


class ArithmeticTask(Task):
    """`a op b` with operands of 1..level digits; the held-out split spans all levels up to max."""

    name = "arithmetic"

    def __init__(self, seed: int = 0, eval_size: int = 200, min_digits: int = 1, max_digits: int = 3,
                 ops: str = "+", curriculum: bool = True, threshold: float = 0.8) -> None:
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"arithmetic: need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        bad = set(ops) - set(_OPS)
        if not ops or bad:
            raise ValueError(f"arithmetic: ops must be made of {''.join(_OPS)}, got {ops!r}")
        super().__init__(seed, eval_size)
        self.ops = ops
        self.curriculum = Curriculum(min_digits if curriculum else max_digits, max_digits, threshold)
        self.max_digits = max_digits

    def _problem(self, rng: random.Random, level: int) -> Example:
        a, b = (rng.randint(0, 10 ** rng.randint(1, level) - 1) for _ in range(2))
        op = rng.choice(self.ops)
        if op == "-" and b > a:
            a, b = b, a  # non-negative results
        result = _OPS[op](a, b)
        think = addition_steps(a, b) if op == "+" else f"{a}{op}{b}={result}"
        return Example(f"What is {a}{op}{b}?", str(result), r1_completion(think, str(result)))

    def generate(self, rng: random.Random) -> Example:
        return self._problem(rng, self.curriculum.level)

    def generate_eval(self, rng: random.Random) -> Example:
        return self._problem(rng, self.max_digits)

    def update(self, accuracy: float) -> None:
        self.curriculum.update(accuracy)

    @property
    def level(self) -> int:
        return self.curriculum.level

    def state_dict(self) -> dict[str, Any]:
        return {"level": self.curriculum.level, "recent": list(self.curriculum.recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.curriculum.level, self.curriculum.recent = int(state["level"]), list(state["recent"])


def addition_steps(a: int, b: int) -> str:
    """Column addition, least significant digit first: `4+8=12 3+5+1=9` for 34 + 58."""
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={total}")
        carry = total // 10
    return " ".join(steps)


# ---------------------------------------------------------------------------- countdown
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate_expression(text: str) -> tuple[Fraction, list[int]] | None:
    """Value (exact) and the integer literals of an arithmetic expression of + - * / and
    parentheses; None if it is anything else or divides by zero."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None
    numbers: list[int] = []

    def walk(node) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ZeroDivisionError
            return Fraction(_BINOPS[type(node.op)](left, right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            numbers.append(node.value)
            return Fraction(node.value)
        raise ValueError

    try:
        return walk(tree), numbers
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


class CountdownTask(Task):
    """Reach `target` using each of `numbers` exactly once; targets are built from the numbers."""

    name = "countdown"

    def __init__(self, seed: int = 0, eval_size: int = 200, n_numbers: int = 3, max_number: int = 20) -> None:
        if n_numbers < 2 or max_number < 2:
            raise ValueError(f"countdown: need n_numbers >= 2 and max_number >= 2, got {n_numbers}, {max_number}")
        super().__init__(seed, eval_size)
        self.n_numbers, self.max_number = n_numbers, max_number

    def generate(self, rng: random.Random) -> Example:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
            order = numbers[:]
            rng.shuffle(order)
            expression = str(order[0])
            for n in order[1:]:
                op = rng.choice("+-*/")
                candidate = f"({expression}){op}{n}" if op in "*/" else f"{expression}{op}{n}"
                value = evaluate_expression(candidate)
                if value is not None and value[0].denominator == 1 and value[0] >= 0:
                    expression = candidate
                else:
                    expression = f"{expression}+{n}"
            value, used = evaluate_expression(expression)
            if value.denominator == 1 and sorted(used) == sorted(numbers):  # solvable by construction: verified
                target = int(value)
                prompt = f"Using {' '.join(map(str, numbers))} each once, make {target}."
                return Example(prompt, {"numbers": numbers, "target": target},
                               r1_completion(f"{expression}={target}", expression))

    def check(self, given: str, reference: Any) -> bool:
        result = evaluate_expression(given)
        if result is None:
            return False
        value, used = result
        return value == reference["target"] and sorted(used) == sorted(reference["numbers"])


# ---------------------------------------------------------------------------- JSONL
class JsonlTask(Task):
    """`{"prompt": str, "answer": str | number}` per line; a seeded `eval_fraction` is held out."""

    name = "jsonl"

    def __init__(self, path: str | Path, seed: int = 0, eval_fraction: float = 0.1) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {path} not found")
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        examples = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"]:
                raise ValueError(f"{path}:{number}: expected an object with a non-empty string \"prompt\"")
            answer = record.get("answer")
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise ValueError(f"{path}:{number}: \"answer\" must be a string or a number, got {answer!r}")
            examples.append(Example(record["prompt"], str(answer), record.get("solution", "") or ""))
        if not examples:
            raise ValueError(f"{path}: no records")
        order = list(range(len(examples)))
        random.Random(f"jsonl-{seed}").shuffle(order)
        n_eval = int(len(examples) * eval_fraction)
        super().__init__(seed, n_eval)
        self._eval = [examples[i] for i in order[:n_eval]]
        self.train = [examples[i] for i in order[n_eval:]]
        if not self.train:
            raise ValueError(f"{path}: every record is held out; lower eval_fraction")

    def generate(self, rng: random.Random) -> Example:
        return self.train[rng.randrange(len(self.train))]

    def train_batch(self, rng: random.Random, n: int) -> list[Example]:
        return [self.generate(rng) for _ in range(n)]


def build_task(name: str | None = None, data: str | Path | None = None, seed: int = 0, **options) -> Task:
    """`arithmetic` or `countdown` (options go to the task), or a JSONL file of prompts."""
    if (name is None) == (data is None):
        raise ValueError("give either a task name (arithmetic, countdown) or a JSONL prompt file, not both")
    if data is not None:
        return JsonlTask(data, seed, **options)
    if name == "arithmetic":
        return ArithmeticTask(seed, **options)
    if name == "countdown":
        return CountdownTask(seed, **options)
    raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)} (or a JSONL file of prompts)")
