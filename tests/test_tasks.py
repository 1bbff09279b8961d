"""GRPO tasks: seeded, held-out splits kept out of training, solvable countdowns, curriculum, JSONL errors."""

from __future__ import annotations

import json
import random

import pytest

from seekformer.training.rewards import accuracy, extract_answer, format_reward
from seekformer.training.tasks import (
    ArithmeticTask,
    CountdownTask,
    addition_steps,
    build_task,
    evaluate_expression,
)


def test_arithmetic_split_seeded_and_solutions_correct():
    task = ArithmeticTask(seed=1, eval_size=50, max_digits=2, ops="+-*")
    held = task.eval_set()
    assert len({e.prompt for e in held}) == 50
    assert [e.prompt for e in ArithmeticTask(seed=1, eval_size=50, max_digits=2, ops="+-*").eval_set()] == \
        [e.prompt for e in held]
    assert [e.prompt for e in ArithmeticTask(seed=2, eval_size=50, max_digits=2, ops="+-*").eval_set()] != \
        [e.prompt for e in held]
    batch = task.train_batch(random.Random(0), 300)
    assert not {e.prompt for e in batch} & {e.prompt for e in held}
    for example in held + batch:
        expression = example.prompt.removeprefix("What is ").removesuffix("?")
        assert str(eval(expression)) == example.answer  # noqa: S307 - digits and one operator
        assert format_reward([example.solution]) == [1.0]
        assert accuracy([example.solution], [example.answer], check=task.check) == [1.0]
    assert addition_steps(34, 58) == "4+8=12 3+5+1=9"
    assert addition_steps(95, 7) == "5+7=12 9+0+1=10"


def test_arithmetic_curriculum_and_state():
    task = ArithmeticTask(eval_size=20, min_digits=1, max_digits=3, threshold=0.8)
    assert task.level == 1
    rng = random.Random(0)
    assert all(len(part) == 1 for e in task.train_batch(rng, 50) for part in e.prompt[8:-1].split("+"))
    for acc in (0.9, 0.5, 0.9, 0.9, 0.9):  # mean 0.82 over the window of 5
        task.update(acc)
    assert task.level == 2
    state = task.state_dict()
    other = ArithmeticTask(eval_size=20, min_digits=1, max_digits=3)
    other.load_state_dict(json.loads(json.dumps(state)))
    assert other.level == 2
    for _ in range(20):
        task.update(1.0)
    assert task.level == 3  # capped at max_digits


def test_countdown_is_solvable_by_construction():
    task = CountdownTask(seed=0, eval_size=30, n_numbers=4, max_number=12)
    for example in task.eval_set() + task.train_batch(random.Random(1), 100):
        ref = example.answer
        expression = extract_answer(example.solution)
        assert task.check(expression, ref)
        value, used = evaluate_expression(expression)
        assert value == ref["target"] and sorted(used) == sorted(ref["numbers"])
    ref = {"numbers": [3, 5, 7], "target": 22}
    assert task.check("3*5+7", ref) and task.check("(7*3)+5-4+4", ref) is False
    assert not task.check("3*5+7+0", ref)  # a number that was not given
    assert not task.check("15+7", ref) and not task.check("__import__('os')", ref) and not task.check("7/0", ref)
    assert not task.check("3*5+7.0", ref)  # literals must be the given integers


def test_jsonl_task_and_errors(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "answer": i}) for i in range(20)) + "\n\n")
    task = build_task(data=path, seed=0, eval_fraction=0.25)
    assert len(task.eval_set()) == 5 and len(task.train) == 15
    assert not {e.prompt for e in task.train_batch(random.Random(0), 40)} & {e.prompt for e in task.eval_set()}
    assert task.check("7", 7)

    for text, message in (('{"prompt": "a", "answer": 1}\n{"prompt": "b"', "prompts.jsonl:2: not valid JSON"),
                          ('{"answer": 1}', ":1: expected an object"),
                          ('{"prompt": "a", "answer": [1]}', ":1: \"answer\" must be")):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            build_task(data=path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        build_task(data=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unknown task 'sudoku'"):
        build_task("sudoku")
