"""`torchrun --nproc-per-node 2 -m seekformer train` against one process: the same metrics fields and
losses; its distributed checkpoint resumed on one process continues the same run; the exported model
equals the one-process run's and transformers reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config
from distributed_workers import rewound_copy, run_cli

from seekformer import load_model
from seekformer.training.checkpointing import CHECKPOINTS
from seekformer.training.metrics import read_metrics
from seekformer.training.pretrain import Trainer

SETTINGS = ["run.dtype='fp32'", "run.device='cpu'", "run.steps=4", "run.save_every=2", "run.eval_every=0",
            "run.log_every=1", "data.eval_batches=2", "run.threads=1"]



def _train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = tiny_run_config(data_dir, *SETTINGS)
    single = Trainer(cfg, root / "single", progress=False)
    single.train()
    config_file = cfg.save(root / "config.json")
    run_cli("train", "--config", str(config_file), "--out", str(root / "dist"), "--set", "parallel.ep=2",
            "--no-plots", "--no-progress", torchrun=True)
    return root / "single", root / "dist"


def test_torchrun_writes_the_same_metrics_and_losses(runs):
    single, dist = runs
    ref, got = _train_records(single), _train_records(dist)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert set(got[0]) == set(ref[0])
    for a, b in zip(ref, got):
        for key in ("loss", "mtp_loss_1", "balance_loss", "grad_norm", "maxvio_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
        assert b["tokens"] == a["tokens"]
    assert (dist / CHECKPOINTS / "step_000004" / ".metadata").is_file()


def test_exported_model_equals_the_one_process_run(runs):
    single, dist = runs
    ours, reference = load_model(dist / "final"), load_model(single / "final").state_dict()
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=5e-6, msg=name)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(dist / "final", dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.eval()(ids), rtol=1e-4, atol=1e-4)


def test_resume_on_one_process_continues_the_two_process_run(runs, tmp_path):
    single, dist = runs

    run = rewound_copy(dist, tmp_path / "resumed")  # as if it had stopped after step 2
    run_cli("train", "--resume", str(run), "--set", "parallel.ep=1", "--no-plots", "--no-progress")
    ref, got = _train_records(single), _train_records(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(ref[2:], got[2:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
    out = tmp_path / "exported"
    run_cli("export", str(run), "--out", str(out))
    reference = load_model(single / "final").state_dict()
    for name, value in load_model(out).state_dict().items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=5e-6, msg=name)
