"""Rule-based rewards: hand-checked cases, user rewards by module:function, and errors that name the reward."""

from __future__ import annotations

import pytest

from seekformer.training.rewards import (
    RewardError,
    Rewards,
    accuracy,
    answers_match,
    extract_answer,
    format_reward,
    overlong,
    tag_count,
)

GOOD = "<think>2+3 is 5</think><answer>5</answer>"


def test_accuracy_and_answer_extraction():
    assert extract_answer("x <answer> 41 </answer> y <answer>42</answer>") == "42"  # the last one counts
    assert extract_answer("no tags") is None
    assert answers_match("1,000", "1000") and answers_match("2.50", 2.5) and answers_match("abc", " abc ")
    assert not answers_match("12", "13") and not answers_match("nan", "NaN")
    completions = [GOOD, "<answer>5.0</answer>", "<answer>6</answer>", "5", "<answer>5"]
    assert accuracy(completions, ["5"] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert accuracy(["<answer>x</answer>"], [None], check=lambda given, ref: given == "x") == [1.0]


def test_format_and_tag_count():
    completions = [GOOD, f"  {GOOD}\n", "<answer>5</answer>", f"{GOOD} trailing", "<think>a</think><answer>1</answer>"
                   "<answer>2</answer>", "<think><think></think><answer>5</answer>"]
    assert format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    # the repeated tags pass the regular expression above but not the count
    assert tag_count(completions) == [1.0, 1.0, 0.5, 1.0, 0.5, 0.75]


def test_overlong_penalty():
    # max 20, buffer 5: free up to 15 tokens, then -1/5 per token, -1 at 20
    values = overlong([""] * 5, completion_lengths=[10, 15, 16, 18, 20], max_completion_length=20,
                      overlong_buffer=5)
    assert values == pytest.approx([0.0, 0.0, -0.2, -0.6, -1.0])


def test_weighted_rewards_and_user_function(tmp_path, monkeypatch):
    (tmp_path / "grpo_user_rewards.py").write_text(
        "def brevity(completions, answers, **info):\n"
        "    return [-len(c) / 100 for c in completions]\n"
        "def broken(completions, answers, **info):\n"
        "    raise KeyError('oops')\n"
        "def wrong_type(completions, answers, **info):\n"
        "    return ['high'] * len(completions)\n"
        "def short(completions, answers, **info):\n"
        "    return [1.0]\n"
        "def nan(completions, answers, **info):\n"
        "    return [float('nan')] * len(completions)\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rewards = Rewards({"accuracy": 1.0, "format": 0.5, "grpo_user_rewards:brevity": 2.0})
    completions = [GOOD, "<answer>4</answer>"]
    total, per_fn = rewards.score(completions, ["5", "4"])
    assert per_fn["accuracy"] == [1.0, 1.0] and per_fn["format"] == [1.0, 0.0]
    assert total == pytest.approx([1.0 + 0.5 - 2 * len(GOOD) / 100, 1.0 - 2 * 18 / 100])

    for name, message in (("grpo_user_rewards:broken", "raised KeyError"), ("grpo_user_rewards:wrong_type", "'high'"),
                          ("grpo_user_rewards:short", "1 values for 2"), ("grpo_user_rewards:nan", "finite")):
        with pytest.raises(RewardError, match=name) as info:
            Rewards({name: 1.0}).score(completions, ["5", "4"])
        assert message in str(info.value)
    for name, message in (("grpo_user_rewards:NOT_CALLABLE", "no callable"), ("no_such_module_x:f", "cannot import"),
                          ("speed", "unknown reward")):
        with pytest.raises(RewardError, match=message):
            Rewards({name: 1.0})
    with pytest.raises(RewardError, match="weight"):
        Rewards({"accuracy": "1"})
