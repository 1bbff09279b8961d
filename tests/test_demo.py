"""`seekformer demo`: prepares the default corpus, trains, samples, writes a loadable model."""

from __future__ import annotations

import json

import pytest
import torch

from seekformer import cli, load_model
from seekformer.training.metrics import read_metrics
from seekformer.training.pretrain import Trainer
from seekformer.training.run_config import RunConfig


@pytest.mark.slow
def test_demo_learns_and_writes_a_loadable_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "demo", "demo")
    out, data = tmp_path / "demo", tmp_path / "data"
    # 8 steps within a minute (a step takes well under a second on a quiet machine), so that how much the
    # model learns does not depend on the machine's load; small evaluations
    assert cli.main(["demo", "--minutes", "1", "--out", str(out), "--data", str(data), "--no-progress",
                     "--max-new-tokens", "20", "--set", "run.fit_to_time=false", "--set", "run.steps=8",
                     "--set", "data.eval_batches=4"]) == 0
    text = capsys.readouterr().out
    for expected in ("sample", "validation  loss", "MaxVio", str(out / "final"), "loss.png"):
        assert expected in text, expected

    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["run"]["max_minutes"] == 1 and run_config["mtp"]["depth"] == 1
    val = [r for r in read_metrics(out) if r["kind"] == "val"]
    assert val and len({r["step"] for r in val}) == len(val)  # at most one evaluation per step
    # the model learned: validation loss well below the same model's before training (the trainer
    # builds it again from the saved config and seed, and evaluates it on the same batches)
    cfg = RunConfig.load(out / "run_config.json")
    initial = Trainer(cfg, tmp_path / "untrained", progress=False, echo=lambda _: None).evaluate()["val_loss"]
    losses = [(r["step"], r["val_loss"]) for r in val]
    assert val[-1]["step"] == 8 and val[-1]["val_loss"] < initial - 0.5, (initial, losses)

    # the model directory loads here and in transformers, with identical logits
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = load_model(out / "final")
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["num_nextn_predict_layers"] == 1
    assert config["topk_method"] == "noaux_tc" and config["n_shared_experts"] >= 1
    theirs = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    ids = torch.tensor([tokenizer.encode("def main():\n    return", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=2e-4, rtol=1e-4)
