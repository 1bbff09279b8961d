"""Activation checkpointing (`run.activation_checkpointing`): the same training as without it (the
oracle), with the expert loads of a step counted once although every block's forward runs twice."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_run_config
from distributed_workers import record_first_gradients

from seekformer.model.moe import MoE
from seekformer.training.activation_checkpointing import apply_activation_checkpointing
from seekformer.training.grpo_config import GRPOConfig
from seekformer.training.pretrain import Trainer
from seekformer.training.run_config import RunConfigError

ENGRAM = ("model.engram_layer_ids=[1]", "model.engram_heads=2", "model.engram_dim_per_ngram=16",
          "model.engram_table_size=[2048, 2048]")

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = {"progress": False, "echo": lambda msg: None}
STEPS, ACCUM, BATCH, SEQ, TOP_K = 4, 2, 4, 32, 2  # TINY_TRAIN_RUN: batch 4 x 32 tokens, top-2 of 8 experts


def _train(data_dir, run_dir, checkpointing: bool) -> dict:
    cfg = tiny_run_config(data_dir, "run.dtype='fp32'", "run.device='cpu'", f"data.grad_accum={ACCUM}",
                          f"run.activation_checkpointing={str(checkpointing).lower()}")
    trainer = Trainer(cfg, run_dir, **QUIET)
    grads = record_first_gradients(trainer, lambda: {n: p.grad.clone() for n, p in
                                                     trainer.model.named_parameters() if p.grad is not None})
    moe_calls = [0]
    for module in trainer.model.modules():
        if isinstance(module, MoE):
            module.register_forward_pre_hook(lambda *args: moe_calls.__setitem__(0, moe_calls[0] + 1))
    steps = [trainer.train_step() for _ in range(STEPS)]
    calls_in_training = moe_calls[0]
    return {"scalars": [{k: float(v) for k, v in s.items()} for s, _ in steps],
            "loads": [loads for _, loads in steps], "grads": grads, "state": trainer.model.state_dict(),
            "val": trainer.evaluate(), "moe_calls": calls_in_training,
            "biases": {n: m.gate.e_score_correction_bias for n, m in trainer.moes.items()}}


def test_checkpointing_trains_the_same_and_counts_loads_once(data_dir, tmp_path):
    plain = _train(data_dir, tmp_path / "plain", checkpointing=False)
    ckpt = _train(data_dir, tmp_path / "ckpt", checkpointing=True)
    # the blocks really ran twice: a count kept in the modules would have doubled
    assert ckpt["moe_calls"] == 2 * plain["moe_calls"] > 0
    for name in ("layers.1", "mtp.0"):
        assert name in ckpt["loads"][0]
    for step, loads in enumerate(ckpt["loads"]):
        for name, counts in loads.items():  # every token of every micro-batch goes to K experts, once
            tokens = ACCUM * BATCH * (SEQ - 1 if name.startswith("mtp") else SEQ)  # MTP: one position less
            assert int(counts.sum()) == tokens * TOP_K, (step, name)
            assert torch.equal(counts, plain["loads"][step][name]), (step, name)
    for ref, got in zip(plain["scalars"], ckpt["scalars"]):
        for key in ("loss", "mtp_loss_1", "balance_loss", "grad_norm"):
            assert got[key] == pytest.approx(ref[key], rel=1e-6, abs=0), key
    assert set(ckpt["grads"]) == set(plain["grads"])
    for name, grad in ckpt["grads"].items():
        torch.testing.assert_close(grad, plain["grads"][name], rtol=1e-6, atol=1e-9, msg=name)
    assert set(ckpt["state"]) == set(plain["state"])  # names unchanged: checkpoints load either way
    for name, value in ckpt["state"].items():
        torch.testing.assert_close(value, plain["state"][name], rtol=1e-6, atol=1e-8, msg=name)
    for name, bias in ckpt["biases"].items():
        assert bias.abs().max() > 0  # the biases moved ...
        torch.testing.assert_close(bias, plain["biases"][name], rtol=0, atol=1e-9)  # ... by the same updates
    assert ckpt["val"]["val_maxvio"] == plain["val"]["val_maxvio"]  # evaluation (no grad) is unaffected
    assert ckpt["val"]["val_loss"] == pytest.approx(plain["val"]["val_loss"], rel=1e-6)


@pytest.mark.parametrize("settings", [("run.dtype='fp8'",), ENGRAM], ids=["fp8", "engram-bf16"])
def test_checkpointing_leaves_fp8_and_engram_training_unchanged(data_dir, tmp_path, settings):
    """V3's FP8 recipe (quantised again in the recomputation) and Engram's sparse tables under bf16."""
    runs = {}
    for on in (False, True):
        cfg = tiny_run_config(data_dir, "run.device='cpu'", *settings,
                              f"run.activation_checkpointing={str(on).lower()}")
        trainer = Trainer(cfg, tmp_path / str(on), **QUIET)
        runs[on] = [float(trainer.train_step()[0]["loss"]) for _ in range(3)], trainer.model.state_dict()
    assert runs[True][0] == runs[False][0]
    for name, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_checkpointing_is_applied_once_and_validated(data_dir, tmp_path):
    trainer = Trainer(tiny_run_config(data_dir, "run.activation_checkpointing=true"), tmp_path / "r", **QUIET)
    with pytest.raises(ValueError, match="already applied"):
        apply_activation_checkpointing(trainer.model)
    with pytest.raises(RunConfigError, match="run.activation_checkpointing"):
        tiny_run_config(data_dir, "run.activation_checkpointing='yes'")
    with pytest.raises(RunConfigError, match="activation_checkpointing is not supported by GRPO"):
        GRPOConfig().apply_overrides(["run.activation_checkpointing=true"])
