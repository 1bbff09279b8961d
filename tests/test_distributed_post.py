"""Data-parallel post-training on 2 gloo processes against one process (fp32):
- `torchrun --nproc-per-node 2 -m seekformer sft` (uneven shards of each global batch, MTP loss, router
  bias updates, validation): the same per-step losses, validation loss and final weights; its step-2
  checkpoint resumed on one process continues the same run;
- GRPO, given the completions a one-process run sampled (each rank generates its own otherwise): the
  same losses, metrics and weights after two steps, for every loss type; held-out evaluation split
  over ranks equals one process's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_workers import launch, rewound_copy, run_cli
from post_training_workers import grpo_steps, record_rollouts
from sft_helpers import arithmetic, make_model_dir, make_tokenizer, write_jsonl

from seekformer import load_model
from seekformer.commands.demo_r1 import TASK_OPTIONS, build_policy
from seekformer.distributed.mesh import ParallelError
from seekformer.distributed.post_training import data_parallel_layout
from seekformer.training.checkpointing import CHECKPOINTS
from seekformer.training.grpo import GRPOConfig
from seekformer.training.metrics import read_metrics
from seekformer.training.sft import SFTConfig, SFTTrainer
from seekformer.training.tasks import ArithmeticTask

SFT_SETTINGS = ["data.batch_size=5", "data.grad_accum=2", "data.val_fraction=0.2", "run.steps=4", "run.save_every=2",
                "run.eval_every=2", "run.log_every=1", "run.dtype='fp32'", "run.device='cpu'", "run.threads=1",
                "optim.lr=3e-3", "loss.mtp_weight=0.3", "balance.bias_update_speed=0.01"]



def _records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == kind]


@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    model_dir = make_model_dir(root / "model", make_tokenizer())
    data = write_jsonl(root / "train.jsonl", arithmetic(40))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = SFTConfig()
        cfg.apply_overrides([f"model.dir='{model_dir}'", f"data.train='{data}'", *SFT_SETTINGS])
        SFTTrainer(cfg, root / "single", progress=False, echo=lambda _: None).train()
    finally:
        torch.set_num_threads(threads)
    sets = [arg for setting in SFT_SETTINGS for arg in ("--set", setting)]
    run_cli("sft", "--model", str(model_dir), "--data", str(data), "--out", str(root / "dist"), *sets,
            "--no-progress", "--no-plots", torchrun=True)
    return root / "single", root / "dist"


def _same_weights(directory: Path, reference: Path) -> None:
    ref = load_model(reference).state_dict()
    for name, value in load_model(directory).state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=0, atol=5e-6, msg=name)


def test_torchrun_sft_equals_one_process(sft_runs):
    single, dist = sft_runs
    ref, got = _records(single, "train"), _records(dist, "train")
    assert [r["step"] for r in got] == [1, 2, 3, 4] and set(got[0]) == set(ref[0])
    for a, b in zip(ref, got):
        for key in ("loss", "mtp_ce_1", "grad_norm", "targets", "tokens", "maxvio_mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    ref_val, got_val = _records(single, "val"), _records(dist, "val")
    assert len(got_val) == len(ref_val) == 2
    for a, b in zip(ref_val, got_val):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
        assert b["val_maxvio"] == pytest.approx(a["val_maxvio"], abs=1e-4)
    assert (dist / CHECKPOINTS / "step_000004" / ".metadata").is_file()
    _same_weights(dist / "final", single / "final")  # router biases included: same global loads


def test_sft_resume_on_one_process_continues_the_two_process_run(sft_runs, tmp_path):
    single, dist = sft_runs
    run = rewound_copy(dist, tmp_path / "resumed")  # as if it had stopped after step 2
    run_cli("sft", "--resume", str(run), "--no-progress", "--no-plots")
    ref, got = _records(single, "train"), _records(run, "train")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(ref[2:], got[2:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
    _same_weights(run / "final", single / "final")


# ---------------------------------------------------------------------------- GRPO
GRPO_CASES = [  # loss type and what else it exercises
    ["grpo.loss_type='dapo'", "grpo.iterations=2", "grpo.beta=0.05"],
    ["grpo.loss_type='bnpo'", "grpo.scale_rewards='batch'"],
    ["grpo.loss_type='dr_grpo'", "grpo.scale_rewards='none'"],
    ["grpo.loss_type='grpo'", "grpo.routing_replay=true", "grpo.update_router_bias=true"],
]
GRPO_STEPS = 2


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return build_policy(tmp_path_factory.mktemp("policy") / "init", ArithmeticTask(**TASK_OPTIONS), seed=0)


def _grpo_config(policy, *overrides: str) -> dict:
    cfg = GRPOConfig()
    cfg.apply_overrides([f"grpo.model='{policy}'", "grpo.prompts_per_step=4", "grpo.group_size=4",
                         "grpo.micro_batch=4", "grpo.max_new_tokens=8", "grpo.eval_size=8", "grpo.eval_batch=4",
                         "run.steps=2", "run.threads=1", "run.dtype='fp32'", "run.device='cpu'", "optim.lr=1e-3",
                         "optim.grad_clip=0.5", "grpo.mask_truncated=false", "rewards.tag_count=1.0",
                         "rewards.overlong=1.0", "reward_options.overlong_buffer=6", *overrides])
    cfg.task.options = dict(TASK_OPTIONS)
    return cfg.to_dict()


def test_grpo_update_on_two_processes_equals_one_process(policy, tmp_path):
    configs = [_grpo_config(policy, *case) for case in GRPO_CASES]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = [record_rollouts(cfg, str(tmp_path / f"single{i}"), GRPO_STEPS) for i, cfg in enumerate(configs)]
    finally:
        torch.set_num_threads(threads)
    results = launch(grpo_steps, 2, (configs, [r["rollouts"] for r in reference], str(tmp_path / "dist"),
                                     GRPO_STEPS), timeout=150)
    for case, ref in zip(GRPO_CASES, reference):
        assert ref["moved"] > 0, case  # the rollouts carried a learning signal
    for rank, outputs in enumerate(results):
        assert "ParallelError" in outputs[-1] and "does not divide grpo.prompts_per_step=3" in outputs[-1]
        for case, ref, got in zip(GRPO_CASES, reference, outputs):
            assert got["eval"] == ref["eval"], (rank, case)
            for a, b in zip(ref["records"], got["records"]):
                for key in ("loss", "grad_norm", "reward", "reward_std", "accuracy", "entropy", "clip_region",
                            "frac_zero_std", "trained_rows", "completion_length", "kl", "router_drift"):
                    if key in a:
                        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (rank, case, a["step"], key)
            for name, value in got["state"].items():
                torch.testing.assert_close(value, ref["state"][name], rtol=0, atol=5e-6,
                                           msg=f"rank {rank} {case} {name}")


def test_post_training_refuses_what_it_does_not_offer():
    with pytest.raises(ParallelError, match="expert parallelism is not offered for `seekformer grpo`"):
        data_parallel_layout(2, 0, 0, 2, "grpo")
    with pytest.raises(ParallelError, match="dp_shard=1 is not the world size 2"):
        data_parallel_layout(2, 0, 1, 1, "sft")
    assert data_parallel_layout(2, 1, 0, 1, "sft").dp == 2
