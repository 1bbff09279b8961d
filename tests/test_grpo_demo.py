"""`seekformer demo --r1` at a small budget: GRPO raises the held-out accuracy of the SFT-warmed model."""

from __future__ import annotations

import pytest

from seekformer.commands.demo_r1 import run_r1
from seekformer.training.metrics import read_metrics


@pytest.mark.slow
def test_grpo_improves_held_out_accuracy(tmp_path, capsys, one_thread):
    # the full warm-up (300 SFT steps), then 30 GRPO steps: about a minute on 2 quiet cores
    result = run_r1(tmp_path / "demo", minutes=30, overrides=["run.steps=30", "grpo.eval_every=0"], progress=False)
    evals = [r for r in read_metrics(result.run_dir) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 30]
    before, after = evals[0]["eval_accuracy"], evals[-1]["eval_accuracy"]
    assert after >= before + 0.03, (before, after)
    assert "held-out accuracy" in capsys.readouterr().out
    assert (result.run_dir / "plots" / "accuracy.png").is_file()
