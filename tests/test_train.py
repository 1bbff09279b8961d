"""Pretraining loop: learning, exact resume, checkpoint integrity, metrics, plots, CLI."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from conftest import kill_at, step_losses, tiny_run_config
from safetensors.torch import load_file

from seekformer import cli, load_model
from seekformer.checkpoint import CheckpointError
from seekformer.training.checkpointing import CHECKPOINTS, LATEST, latest_checkpoint
from seekformer.training.metrics import read_metrics
from seekformer.training.plots import plot_run
from seekformer.training.pretrain import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_run_lowers_validation_loss(data_dir, tmp_path):
    cfg = tiny_run_config(data_dir, "run.steps=40", "run.log_every=10", "run.eval_every=20", "run.save_every=20",
                  "optim.lr=3e-3")
    trainer = Trainer(cfg, tmp_path / "run", progress=False, echo=lambda _: None)
    before = trainer.evaluate()["val_loss"]
    assert before == pytest.approx(math.log(384), abs=0.3)  # an untrained model is near uniform
    result = trainer.train()
    assert result.step == 40 and result.tokens == 40 * 4 * 32
    assert result.val["val_loss"] < before - 0.8
    # every metric the issue asks for is logged
    train = [r for r in read_metrics(result.run_dir) if r["kind"] == "train"]
    val = [r for r in read_metrics(result.run_dir) if r["kind"] == "val"]
    assert [r["step"] for r in train] == [10, 20, 30, 40] and [r["step"] for r in val] == [20, 40]
    for key in ("loss", "mtp_loss_1", "balance_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "maxvio",
                "expert_load", "maxvio_mean", "mtp_weight", "bias_update_speed"):
        assert key in train[-1], key
    assert set(train[-1]["maxvio"]) == {"layers.1", "mtp.0"}
    for key in ("val_loss", "val_ppl", "val_mtp_loss_1", "val_maxvio"):
        assert key in val[-1], key
    assert val[-1]["val_ppl"] == pytest.approx(math.exp(val[-1]["val_loss"]))
    assert train[0]["lr"] < train[-1]["lr"] * 10  # warmup then cosine to 0.1x: lr values are sane
    # the final model is a loadable hub directory with the tokenizer; same weights as the trainer's
    model = load_model(result.final_dir)
    assert (result.final_dir / "tokenizer.json").is_file()
    x = torch.randint(0, 384, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x), trainer.model.eval()(x))
    assert sorted(p.name for p in (result.run_dir / CHECKPOINTS).iterdir()) == [LATEST, "step_000020", "step_000040"]
    assert {p.name for p in plot_run(result.run_dir)} == {"loss.png", "maxvio.png", "expert_load.png"}


def test_maxvio_matches_logged_loads(data_dir, tmp_path):
    result = Trainer(tiny_run_config(data_dir, "run.steps=3", "run.log_every=1", "run.eval_every=0"), tmp_path / "r",
                     progress=False, echo=lambda _: None).train()
    for record in (r for r in read_metrics(result.run_dir) if r["kind"] == "train"):
        for layer, loads in record["expert_load"].items():
            assert sum(loads) == pytest.approx(len(loads), abs=1e-2)  # loads are relative to the mean
            assert record["maxvio"][layer] == pytest.approx(max(loads) - 1, abs=1e-3)


@pytest.mark.parametrize(("eval_every", "expected_steps", "expected_eval_every"), [(100, 92, 23), (2, 41, 1)])
def test_fit_to_time(data_dir, tmp_path, eval_every, expected_steps, expected_eval_every):
    cfg = tiny_run_config(data_dir, "run.steps=400", "run.log_every=8", f"run.eval_every={eval_every}",
                          "run.save_every=0", "run.max_minutes=5", "run.fit_to_time=true")
    trainer = Trainer(cfg, tmp_path / "run", progress=False, echo=lambda _: None)
    # 100 s left at 1 s per step; an evaluation of 4 batches costs about 4/3 s (forward only)
    trainer._fit_to_time(time.perf_counter() + 100, 1.0, None)
    assert abs(cfg.run.steps - expected_steps) <= 1
    assert cfg.run.eval_every == expected_eval_every and cfg.run.log_every == max(1, round(8 * cfg.run.steps / 400))
    assert cfg.run.save_every == 0
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["run"]["steps"] == cfg.run.steps


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_continues_the_same_trajectory(data_dir, tmp_path, dtype):
    sets = ("run.steps=10", "run.log_every=1", "run.eval_every=5", "run.save_every=4", f"run.dtype='{dtype}'",
            "data.grad_accum=2")
    quiet = {"progress": False, "echo": lambda _: None}
    straight = Trainer(tiny_run_config(data_dir, *sets), tmp_path / "a", **quiet).train()

    interrupted = Trainer(tiny_run_config(data_dir, *sets), tmp_path / "b", **quiet)
    kill_at(interrupted, 7)  # after the checkpoint of step 4 ... and past it: steps 5-7 are lost
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert latest_checkpoint(tmp_path / "b").name == "step_000004"
    resumed = Trainer.resume(tmp_path / "b", **quiet)
    assert resumed.step == 4
    result = resumed.train()

    assert step_losses(tmp_path / "b") == step_losses(tmp_path / "a")  # exactly equal, every step
    val = lambda run: [(r["step"], r["val_loss"]) for r in read_metrics(run) if r["kind"] == "val"]  # noqa: E731
    assert val(tmp_path / "b") == val(tmp_path / "a")
    a = load_file(str(straight.final_dir / "model.safetensors"))
    b = load_file(str(result.final_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # router biases included


def test_kill_during_save_resumes_from_last_complete_checkpoint(data_dir, tmp_path):
    cfg = tiny_run_config(data_dir, "run.steps=4", "run.save_every=2", "run.eval_every=0")
    trainer = Trainer(cfg, tmp_path / "run", progress=False, echo=lambda _: None)
    kill_at(trainer, 3)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    root = tmp_path / "run" / CHECKPOINTS
    # what a kill in the middle of the next save leaves: a half-written temp dir, and a step dir
    # renamed into place whose `latest` update never happened
    (root / ".tmp-step_000004-x").mkdir()
    (root / ".tmp-step_000004-x" / "model.safetensors").write_bytes(b"\0" * 10)
    (root / "step_000004").mkdir()
    resumed = Trainer.resume(tmp_path / "run", progress=False, echo=lambda _: None)
    assert resumed.step == 2
    resumed.train()
    assert latest_checkpoint(tmp_path / "run").name == "step_000004"
    assert not list(root.glob(".tmp-*"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "remove", "manifest"])
def test_damaged_checkpoint_is_reported(data_dir, tmp_path, damage):
    cfg = tiny_run_config(data_dir, "run.steps=2", "run.eval_every=0")
    Trainer(cfg, tmp_path / "run", progress=False, echo=lambda _: None).train()
    ckpt = tmp_path / "run" / CHECKPOINTS / "step_000002"
    weights = ckpt / "model.safetensors"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
        match = "model.safetensors is corrupted"
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
        match = "model.safetensors has 1000 bytes"
    elif damage == "remove":
        (ckpt / "trainer_state.safetensors").unlink()
        match = "missing trainer_state.safetensors"
    else:
        (ckpt / "manifest.json").unlink()
        match = "incomplete"
    with pytest.raises(CheckpointError, match=match):
        Trainer.resume(tmp_path / "run", progress=False, echo=lambda _: None)


def test_latest_pointing_nowhere_is_reported(data_dir, tmp_path):
    Trainer(tiny_run_config(data_dir, "run.steps=1", "run.eval_every=0"), tmp_path / "run", progress=False,
            echo=lambda _: None).train()
    (tmp_path / "run" / CHECKPOINTS / LATEST).write_text("step_000099\n")
    with pytest.raises(CheckpointError, match="step_000099"):
        Trainer.resume(tmp_path / "run", progress=False, echo=lambda _: None)


def test_new_run_refuses_an_existing_run(data_dir, tmp_path):
    Trainer(tiny_run_config(data_dir, "run.steps=1"), tmp_path / "run", progress=False, echo=lambda _: None)
    with pytest.raises(ValueError, match="--resume"):
        Trainer(tiny_run_config(data_dir, "run.steps=1"), tmp_path / "run", progress=False, echo=lambda _: None)


def test_resume_only_accepts_run_overrides(data_dir, tmp_path):
    Trainer(tiny_run_config(data_dir, "run.steps=1"), tmp_path / "run", progress=False, echo=lambda _: None)
    with pytest.raises(ValueError, match="optim.lr"):
        Trainer.resume(tmp_path / "run", ["optim.lr=1"], progress=False)


def test_aux_free_balancing_needs_a_biased_router(data_dir, tmp_path):
    cfg = tiny_run_config(data_dir, "model.preset='tiny-v2'", "mtp.depth=0")
    with pytest.raises(ValueError, match="bias_update_speed=0"):
        Trainer(cfg, tmp_path / "run", progress=False)


def test_cli_train_resume_and_plot(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "train", "train")
    monkeypatch.setitem(cli.COMMANDS, "plot", "plot")
    config = tmp_path / "run.toml"
    config.write_text("[model]\npreset = 'tiny-v3'\nhidden_size = 64\n\n[run]\nsteps = 2\neval_every = 0\n\n"
                      f"[data]\ndir = '{data_dir}'\nseq_len = 32\nbatch_size = 2\n")
    out = tmp_path / "run"
    assert cli.main(["train", "--config", str(config), "--out", str(out), "--set", "optim.lr=1e-3",
                     "--no-progress", "--no-plots"]) == 0
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["optim"]["lr"] == 1e-3 and saved["model"]["hidden_size"] == 64 and saved["run"]["steps"] == 2
    assert cli.main(["train", "--resume", str(out), "--set", "run.steps=3", "--no-progress", "--no-plots"]) == 0
    assert "step 3" in capsys.readouterr().out
    assert cli.main(["plot", str(out)]) == 0
    assert (out / "plots" / "loss.png").is_file()
    assert cli.main(["train", "--out", str(tmp_path / "x"), "--set", "optim.lrr=1"]) == 2
    assert "unknown setting 'optim.lrr'" in capsys.readouterr().err
