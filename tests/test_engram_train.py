"""Training Engram models with `Trainer`: SparseAdam table group, sparse-aware clipping, resume, example."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import kill_at, step_losses, tiny_run_config
from safetensors.torch import load_file

from seekformer import cli, load_model
from seekformer.checkpoint import CheckpointError
from seekformer.data import BatchSampler
from seekformer.training.checkpointing import CHECKPOINTS, STATE_JSON, STATE_TENSORS, latest_checkpoint, load_checkpoint
from seekformer.training.metrics import read_metrics
from seekformer.training.optim import clip_grad_norm
from seekformer.training.pretrain import Trainer
from seekformer.training.run_config import RunConfig, RunConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "engram.toml"
ENGRAM = [  # the tiny model of the training tests with an Engram module in layer 1
    "model.engram_layer_ids=[1]", "model.engram_heads=2", "model.engram_dim_per_ngram=16",
    "model.engram_table_size=[2048, 2048]",
]
QUIET = {"progress": False, "echo": lambda _: None}


pytestmark = pytest.mark.usefixtures("one_thread")


def _config(data_dir: Path, *overrides: str) -> RunConfig:
    return tiny_run_config(data_dir, *ENGRAM, *overrides)


def test_table_step_moves_only_looked_up_rows_by_the_scaled_lr(data_dir, tmp_path):
    lr, mult = 1e-3, 4.0
    cfg = _config(data_dir, f"optim.lr={lr}", f"engram.lr_multiplier={mult}", "optim.weight_decay=0.1",
                  "optim.grad_clip=0", "schedule.kind='constant'", "schedule.warmup_steps=0", "data.grad_accum=2")
    trainer = Trainer(cfg, tmp_path / "run", **QUIET)
    engram = trainer.model.model.layers[1].engram
    table = engram.table.weight
    assert engram.sparse_grad
    assert all(p is not table for g in trainer.optimizer.param_groups for p in g["params"])
    (group,) = trainer.engram_optimizer.param_groups
    assert group["params"] == [table] and group.get("weight_decay", 0.0) == 0.0

    # the rows this step looks up: the same two micro-batches, drawn from a copy of the sampler
    sampler = BatchSampler(trainer.train_set, 32, 4, seed=0)
    sampler.load_state_dict(trainer.sampler.state_dict())
    rows = torch.cat([(engram.hash_rows(next(sampler)[0]) + engram.offsets).flatten() for _ in range(2)]).unique()
    grads = []
    table.register_post_accumulate_grad_hook(lambda p: grads.append(p.grad.detach().clone()))
    before = table.detach().clone()
    backbone = trainer.model.model.layers[1].engram.key_proj.weight.detach().clone()
    trainer.train_step()

    assert len(grads) == 2 and grads[-1].is_sparse  # accumulated over the two micro-batches, still sparse
    assert group["lr"] == pytest.approx(lr * mult) and trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    untouched = torch.ones(table.shape[0], dtype=torch.bool)
    untouched[rows] = False
    assert untouched.sum() > table.shape[0] // 2
    assert torch.equal(table[untouched], before[untouched])  # bit-identical, backbone weight decay or not
    assert (table[rows] != before[rows]).any(-1).all()
    # first Adam step: m^ = g, v^ = g^2, so each element moves by lr*mult * g / (|g| + eps / sqrt(1 - beta2))
    g = grads[-1].coalesce().to_dense().double()[rows]
    eps = cfg.optim.eps / math.sqrt(1 - cfg.optim.beta2)
    expected = -lr * mult * g / (g.abs() + eps)
    torch.testing.assert_close((table[rows].double() - before[rows].double()), expected, rtol=1e-4, atol=1e-8)
    big = g.abs() > 1e-4
    assert big.sum() > 100
    torch.testing.assert_close((table[rows] - before[rows]).double()[big].abs(),
                               torch.full((int(big.sum()),), lr * mult, dtype=torch.float64), rtol=1e-3, atol=0)
    assert not torch.equal(trainer.model.model.layers[1].engram.key_proj.weight, backbone)  # AdamW stepped too


def test_clipping_includes_the_sparse_table_grads(data_dir, tmp_path):
    trainer = Trainer(_config(data_dir), tmp_path / "run", **QUIET)
    table = trainer.model.model.layers[1].engram.table.weight
    x, y = next(trainer.sampler)
    for _ in range(2):  # two accumulated micro-batches: the sparse grad holds every row twice
        trainer.losses(x, y, 0.3, with_mtp=True)[0]["total"].backward()
    assert table.grad.is_sparse and not table.grad.is_coalesced()
    params = [p for p in trainer.model.parameters() if p.grad is not None]
    dense = {p: p.grad.to_dense().double() for p in params}  # to_dense sums repeated rows
    expected = math.sqrt(sum(float(g.square().sum()) for g in dense.values()))
    # leaving the table out would change the norm by table_share / 2, far above the tolerance below
    table_share = float(dense[table].square().sum()) / expected**2
    assert 1e-4 < table_share < 0.999
    # and so would squaring the uncoalesced values (rows repeated, not summed)
    naive = float(table.grad._values().double().square().sum()) / float(dense[table].square().sum())
    assert abs(naive - 1) > 0.01

    max_norm = expected / 10
    norm = clip_grad_norm(trainer.model.parameters(), max_norm)
    assert float(norm) == pytest.approx(expected, rel=1e-5)
    scale = max_norm / (expected + 1e-6)
    for p, g in dense.items():
        torch.testing.assert_close(p.grad.to_dense().double(), g * scale, rtol=1e-5, atol=1e-12)
    after = math.sqrt(sum(float(p.grad.to_dense().double().square().sum()) for p in params))
    assert after == pytest.approx(max_norm, rel=1e-5)
    assert table.grad.is_sparse and table.grad.is_coalesced()


def test_tiny_engram_run_learns_and_the_final_model_loads(data_dir, tmp_path):
    cfg = _config(data_dir, "run.steps=30", "run.log_every=10", "run.eval_every=15", "run.save_every=0",
                  "optim.lr=3e-3")
    trainer = Trainer(cfg, tmp_path / "run", **QUIET)
    before = trainer.evaluate()
    result = trainer.train()
    assert result.val["val_loss"] < before["val_loss"] - 0.6
    val = [r for r in read_metrics(result.run_dir) if r["kind"] == "val"]
    assert [r["step"] for r in val] == [15, 30]
    assert set(val[-1]["val_engram_gate"]) == {"layers.1"} and 0 < val[-1]["val_engram_gate"]["layers.1"] < 1
    assert val[-1]["val_engram_gate"] != val[0]["val_engram_gate"]  # the gate learns
    # the final directory is a loadable model carrying the compression table; same logits
    model = load_model(result.final_dir)
    assert model.config.engram_layer_ids == [1]
    loaded, trained = model.model.layers[1].engram, trainer.model.model.layers[1].engram
    assert torch.equal(loaded.compression, trained.compression) and torch.equal(loaded.table.weight,
                                                                               trained.table.weight)
    x = torch.randint(0, 384, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(x), trainer.model.eval()(x))


def test_engram_resume_continues_the_same_trajectory(data_dir, tmp_path):
    sets = ("run.steps=8", "run.log_every=1", "run.eval_every=4", "run.save_every=4", "data.grad_accum=2",
            "optim.weight_decay=0.1")
    straight = Trainer(_config(data_dir, *sets), tmp_path / "a", **QUIET).train()
    interrupted = Trainer(_config(data_dir, *sets), tmp_path / "b", **QUIET)
    kill_at(interrupted, 6)  # steps 5-6 are lost: resume from the checkpoint of step 4
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt.name == "step_000004"
    saved = json.loads((ckpt / STATE_JSON).read_text())
    assert saved["engram_optimizer_param_groups"][0]["lr_scale"] == 5.0
    assert saved["engram_optimizer_scalars"] == {"0.step": 4}
    tensors = load_file(str(ckpt / STATE_TENSORS))
    table = interrupted.model.model.layers[1].engram.table.weight
    assert tensors["engram_optimizer.0.exp_avg_sq"].shape == table.shape
    assert STATE_TENSORS in json.loads((ckpt / "manifest.json").read_text())["files"]

    resumed = Trainer.resume(tmp_path / "b", **QUIET)
    assert resumed.step == 4 and resumed.engram_optimizer.state[resumed.model.model.layers[1].engram.table.weight][
        "step"] == 4
    result = resumed.train()
    assert step_losses(tmp_path / "b") == step_losses(tmp_path / "a")  # exactly equal, every step
    val = lambda run: [(r["step"], r["val_loss"], r["val_engram_gate"])  # noqa: E731
                       for r in read_metrics(run) if r["kind"] == "val"]
    assert val(tmp_path / "b") == val(tmp_path / "a")
    a = load_file(str(straight.final_dir / "model.safetensors"))
    b = load_file(str(result.final_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # tables included

    # a damaged optimizer file is caught by the manifest; a state without the tables' optimizer is refused
    final = tmp_path / "b" / CHECKPOINTS / "step_000008"
    state_json = json.loads((final / STATE_JSON).read_text())
    del state_json["engram_optimizer_param_groups"]
    (final / STATE_JSON).write_text(json.dumps(state_json))
    with pytest.raises(CheckpointError, match="no state for engram_optimizer"):
        load_checkpoint(final, resumed.model, resumed.optimizers)
    with pytest.raises(CheckpointError, match="trainer_state.json is corrupted|trainer_state.json has"):
        Trainer.resume(tmp_path / "b", **QUIET)


def test_engram_settings_are_checked():
    with pytest.raises(RunConfigError, match="engram.lr_multiplier must be > 0"):
        RunConfig().apply_overrides(["engram.lr_multiplier=0"])
    with pytest.raises(RunConfigError, match="unknown setting 'engram.lr'"):
        RunConfig().apply_overrides(["engram.lr=1"])


def test_example_config_trains_from_the_cli(data_dir, tmp_path, capsys):
    cfg = RunConfig.load(EXAMPLE)
    model = cfg.model_config(vocab_size=8192)
    assert model.engram_layer_ids == [1] and cfg.engram.lr_multiplier == 5.0 and model.moe_layer_freq
    out = tmp_path / "run"
    sets = [f"data.dir='{data_dir}'", "data.seq_len=32", "data.batch_size=2", "data.eval_batches=1", "run.steps=2",
            "run.max_minutes=0", "run.fit_to_time=false", "run.log_every=1"]
    argv = ["train", "--config", str(EXAMPLE), "--out", str(out), "--no-progress", "--no-plots"]
    assert cli.main(argv + [a for s in sets for a in ("--set", s)]) == 0
    assert "Engram gate layers.1" in capsys.readouterr().out
    assert load_model(out / "final").config.engram_table_size == [8192, 8192]
