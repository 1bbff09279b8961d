"""Distributed runs interrupted and resumed on 2 gloo processes: Engram tables replicated over the
ranks (their averaged row-sparse gradients and SparseAdam state) equal one process with the same
global batch and survive a checkpoint; each rank's generators are saved, so a run with dropout
resumes on the same trajectory."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_run_config
from distributed_workers import interrupted_and_resumed, launch
from safetensors.torch import load_file

from seekformer.training.checkpointing import CHECKPOINTS, MANIFEST
from seekformer.training.pretrain import Trainer

STEPS, SAVE_AT = 3, 2
ENGRAM = ["model.engram_layer_ids=[1]", "model.engram_heads=2", "model.engram_dim_per_ngram=16",
          "model.engram_table_size=[2048, 2048]", "engram.lr_multiplier=5.0"]
TABLE = "model.layers.1.engram.table.weight"


def _config(data_dir, *overrides):
    return tiny_run_config(data_dir, "run.dtype='fp32'", "run.device='cpu'", *overrides)


def test_replicated_engram_tables_equal_one_process(data_dir, tmp_path, one_thread):
    cfg = _config(data_dir, *ENGRAM)
    single = Trainer(cfg, tmp_path / "single", progress=False)
    before = single.model.state_dict()[TABLE].clone()
    ref = [{k: float(v) for k, v in single.train_step()[0].items()} for _ in range(STEPS)]
    ref_state = single.model.state_dict()
    moved = (ref_state[TABLE] != before).any(dim=1)
    assert 0 < int(moved.sum()) < before.shape[0] // 2  # SparseAdam moved the looked-up rows only

    results = launch(interrupted_and_resumed, 2, (cfg.to_dict(), str(tmp_path / "run"), STEPS, SAVE_AT),
                     timeout=150)
    for rank, (history, state, resumed, resumed_state) in enumerate(results):
        for step, (a, b) in enumerate(zip(ref, history)):
            for key in ("loss", "mtp_loss_1"):
                assert b[key] == pytest.approx(a[key], rel=1e-5), (rank, step, key)
            # the norm counts the table's gradient once. The gate's signed square root (derivative
            # 1 / (2 sqrt|x|)) amplifies rounding: one process with the batch in two micro-batches,
            # the same sum, differs from itself by 1.1e-4 at step 2 (this run: 2.3e-5)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5 if step == 0 else 1e-4), (rank, step)
        for key in ("loss", "mtp_loss_1", "grad_norm"):
            assert resumed[0][key] == pytest.approx(history[SAVE_AT][key], rel=1e-6), (rank, key)
        assert torch.equal((state[TABLE] != before).any(dim=1), moved)  # the same rows stepped
        for name, value in state.items():
            # Adam moves each weight by ~lr per step whatever its gradient's size, so rounding in a
            # near-zero gradient shows as ~1e-5 here and there (most in the gate's path). One process
            # with its batch in two micro-batches differs from itself by up to 8.5e-5 (table) and
            # 2.8e-5 (embedding), in 20 and 1 elements; this run: 1.6e-5 and 8e-6, in 6 and 1
            diff = (value - ref_state[name]).abs()
            assert diff.max() < 5e-5 and (diff > 5e-6).float().mean() < 1e-3, (rank, name, float(diff.max()))
        # the resumed run's weights, the replicated table included: SparseAdam's state came back
        for name, value in resumed_state.items():
            torch.testing.assert_close(value, state[name], rtol=0, atol=1e-7, msg=f"rank {rank} resumed {name}")
    assert torch.equal(results[0][1][TABLE], results[1][1][TABLE])  # the replicas are identical


def test_resumed_run_draws_the_same_dropout_masks(data_dir, tmp_path):
    """Attention dropout draws from each rank's torch generator: without its saved state the resumed
    step would draw step 1's masks again (the trainer reseeds on start) and its loss would differ."""
    cfg = _config(data_dir, "model.attention_dropout=0.2")
    run = tmp_path / "run"
    results = launch(interrupted_and_resumed, 2, (cfg.to_dict(), str(run), STEPS, SAVE_AT), timeout=150)
    for rank, (history, _, resumed, _) in enumerate(results):
        assert history[SAVE_AT]["loss"] != pytest.approx(history[0]["loss"], rel=1e-3)
        for key in ("loss", "mtp_loss_1", "grad_norm"):
            assert resumed[0][key] == pytest.approx(history[SAVE_AT][key], rel=1e-6), (rank, key)
    checkpoint = run / CHECKPOINTS / f"step_{SAVE_AT:06d}"
    manifest = (checkpoint / MANIFEST).read_text()
    for rank in range(2):  # one file per rank, covered by the manifest
        assert f"rng_rank_{rank}.safetensors" in manifest
        assert "rng.cpu" in load_file(str(checkpoint / f"rng_rank_{rank}.safetensors"))
