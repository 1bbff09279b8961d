"""The GRPO loop on a tiny V3-style model: log-probs of the sampled distribution, exact resume,
routing replay, dynamic sampling, truncation masking, the reference model, errors, the CLI."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from seekformer import cli
from seekformer.commands.demo_r1 import TASK_OPTIONS, build_policy
from seekformer.training.grpo import GRPOConfig, GRPOTrainer
from seekformer.training.metrics import read_metrics
from seekformer.training.tasks import ArithmeticTask

TIMINGS = ("seconds", "tokens_per_s")


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return build_policy(tmp_path_factory.mktemp("policy") / "init", ArithmeticTask(**TASK_OPTIONS), seed=0)


def make_cfg(policy, *overrides: str) -> GRPOConfig:
    cfg = GRPOConfig()
    cfg.apply_overrides([f"grpo.model='{policy}'", "grpo.prompts_per_step=2", "grpo.group_size=4",
                         "grpo.max_new_tokens=6", "grpo.eval_size=8", "run.steps=3", "run.threads=1",
                         "run.save_every=0", "optim.lr=1e-3", *overrides])
    cfg.task.options = dict(TASK_OPTIONS)
    return cfg


def test_logprobs_are_those_of_the_sampled_distribution(policy, tmp_path, one_thread):
    """The update's log-probs (each prompt once with its completions attending to it, and the
    right-padded rows that models without that path take; chunked head) equal log softmax(logits / T)
    of each sequence run alone through the plain forward, at the rollout's temperature."""
    trainer = GRPOTrainer(make_cfg(policy, "grpo.temperature=0.7", "run.dtype='fp32'"), tmp_path / "rl",
                          progress=False)
    examples = trainer.task.train_batch(__import__("random").Random(0), 2)
    r = trainer.rollout(examples, seed=5)
    # rows of unequal prompt (10, 11 tokens) and completion lengths (one empty): padding in both
    r.completion_ids = [c[:n] for c, n in zip(r.completion_ids, (6, 2, 0, 5, 1, 6, 4, 3))]
    assert len({len(p) for p in r.prompt_ids}) > 1
    assert trainer.shared_prefix
    rows = slice(0, len(r.prompt_ids))
    with torch.no_grad():
        shared = trainer._logprobs(trainer.model, trainer._inputs(r, rows, 6))
        plain = trainer._logprobs(trainer.model, trainer._rows(r.prompt_ids, r.completion_ids, 6))
        for i, (p, c) in enumerate(zip(r.prompt_ids, r.completion_ids)):
            logits = trainer.model(torch.tensor([p + c]))[0, len(p) - 1:len(p) + len(c) - 1].double()
            expected = torch.log_softmax(logits / 0.7, dim=-1).gather(1, torch.tensor(c)[:, None])[:, 0]
            for got in (shared, plain):
                torch.testing.assert_close(got[i, :len(c)].double(), expected, atol=2e-5, rtol=1e-5)
                assert torch.all(got[i, len(c):] == 0)


def test_shared_prompt_update_equals_plain_rows(policy, tmp_path, one_thread):
    """A whole GRPO step (mu = 2 with pi_old's pass, beta > 0, routing replay, micro-batches that cut a
    group in two) gives the same loss, metrics and weights whether each prompt runs once per
    micro-batch or every row runs from position 0 on its own."""
    overrides = ("run.dtype='fp32'", "grpo.micro_batch=3", "grpo.iterations=2", "grpo.beta=0.05",
                 "grpo.routing_replay=true", "grpo.loss_type='grpo'", "grpo.mask_truncated=false")
    trainers = [GRPOTrainer(make_cfg(policy, *overrides), tmp_path / name, progress=False) for name in ("a", "b")]
    trainers[1].shared_prefix = False
    before = {name: value.clone() for name, value in trainers[0].model.state_dict().items()}
    rollout = trainers[0].rollout(trainers[0].task.train_batch(__import__("random").Random(0), 2), seed=5)
    rollout.completion_ids = [c[:n] for c, n in zip(rollout.completion_ids, (6, 2, 0, 5, 1, 6, 4, 3))]
    rollout.rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.25])
    records = []
    for trainer in trainers:
        trainer._collect_rollouts = lambda: (rollout, rollout, {"frac_zero_std": 0.0, "groups_sampled": 2,
                                                                "groups_dropped": 0})
        records.append(trainer.train_step())
    assert records[0]["loss"] != 0
    for key in ("loss", "grad_norm", "entropy", "kl", "clip_region", "router_drift"):
        assert records[0][key] == pytest.approx(records[1][key], rel=1e-4, abs=1e-6), key
    # AdamW moves each weight by up to lr = 1e-3 per iteration whatever its gradient's size, so float
    # noise in near-zero gradients shows in the weights: 1% of the 2e-3 moved
    for (name, a), b in zip(trainers[0].model.state_dict().items(), trainers[1].model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5, msg=name)
    assert max(float((v - before[k]).abs().max()) for k, v in trainers[0].model.state_dict().items()) > 1e-3


def test_bf16_rollout_samples_from_the_current_weights(policy, tmp_path, one_thread):
    """With run.dtype=bf16 the rollout samples from a bf16 copy refreshed from the current fp32
    weights: the same tokens as `generate` on a fresh bf16 copy of the changed model."""
    from seekformer.inference import generate

    trainer = GRPOTrainer(make_cfg(policy, "run.dtype='bf16'"), tmp_path / "rl", progress=False)
    assert trainer.rollout_model.dtype == torch.bfloat16 and trainer.model.dtype == torch.float32
    trainer.train_step()
    torch.manual_seed(0)
    with torch.no_grad():  # what an update does, large enough to change the samples
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    examples = trainer.task.train_batch(__import__("random").Random(0), 2)
    r = trainer.rollout(examples, seed=5)
    oracle = copy.deepcopy(trainer.model).to(torch.bfloat16).eval()
    rows = [p for p in trainer.prompt_ids(examples) for _ in range(trainer.cfg.grpo.group_size)]
    with torch.no_grad():
        out = generate(oracle, rows, max_new_tokens=6, temperature=1.0, seed=5,
                       stop_tokens=[trainer.tokenizer.eos_id])
    assert r.completion_ids == out.tokens
    for (name, a), b in zip(oracle.state_dict().items(), trainer.rollout_model.state_dict().values()):
        assert torch.equal(a, b), name


def _strip(records):
    return [{k: v for k, v in r.items() if not k.endswith(TIMINGS)} for r in records]


def test_resume_reproduces_the_uninterrupted_run(policy, tmp_path, one_thread):
    overrides = ("run.steps=4", "run.save_every=2", "grpo.iterations=2", "grpo.routing_replay=true",
                 "grpo.beta=0.05", "task.options={min_digits=1, max_digits=2, ops='+', curriculum=true}")
    full = GRPOTrainer(make_cfg(policy, *overrides), tmp_path / "full", progress=False)
    full.cfg.task.options["curriculum"] = True
    result = full.train()
    assert result.step == 4

    cut = GRPOTrainer(make_cfg(policy, *overrides), tmp_path / "cut", progress=False)
    original = cut.train_step

    def die_at_step_3():
        if cut.step == 3:
            raise KeyboardInterrupt
        return original()

    cut.train_step = die_at_step_3
    with pytest.raises(KeyboardInterrupt):
        cut.train()
    resumed = GRPOTrainer.resume(tmp_path / "cut", progress=False)
    assert resumed.step == 2
    resumed.train()
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert _strip(read_metrics(tmp_path / "full")) == _strip(read_metrics(tmp_path / "cut"))
    train = [r for r in read_metrics(tmp_path / "full") if r["kind"] == "train"]
    assert all("router_drift" in r and "kl" in r and "clip_region" in r for r in train)
    evals = [r for r in read_metrics(tmp_path / "full") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4] and all("eval_accuracy" in r for r in evals)
    # the aux-loss-free bias stays frozen during RL by default
    for name, value in full.model.state_dict().items():
        if name.endswith("e_score_correction_bias"):
            assert torch.equal(value, GRPOTrainer(make_cfg(policy), tmp_path / "fresh", progress=False)
                               .model.state_dict()[name])
            break
    else:
        pytest.fail("the demo policy has no router bias")


def test_routing_replay_uses_the_recorded_experts(policy, tmp_path, one_thread):
    trainer = GRPOTrainer(make_cfg(policy), tmp_path / "rl", progress=False)
    moe = next(iter(trainer.moes.values()))
    x = torch.randn(10, trainer.model.config.hidden_size)
    moe.eval()
    own, own_route = moe(x)
    route = moe.gate(x)
    moe.replay_indices = route.indices
    assert torch.equal(moe(x)[0], own)  # replaying its own choice changes nothing
    other = (route.indices + 1) % moe.gate.n_experts
    moe.replay_indices = other
    replayed, replayed_route = moe(x)
    moe.replay_indices = None
    # the routing returned is the one used: its loads are the replayed experts'
    assert torch.equal(replayed_route.indices, other) and torch.equal(own_route.indices, route.indices)
    assert torch.equal(moe.gate.select(replayed_route.scores), route.indices)  # the router's own choice
    forced = moe.gate.route_to(route.scores, other)
    expected = moe.experts(x, forced) + moe.shared_experts(x)
    torch.testing.assert_close(replayed, expected)
    assert not torch.allclose(replayed, own)


def test_dynamic_sampling_and_truncation_masking(policy, tmp_path, one_thread, monkeypatch):
    (tmp_path / "grpo_half_flat.py").write_text(
        "def reward(completions, answers, **info):\n"
        "    # the first prompt's group always gets 1 (zero std); the other group varies\n"
        "    first = info['prompts'][0]\n"
        "    return [1.0 if p == first else float(len(c) % 2) for p, c in zip(info['prompts'], completions)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = make_cfg(policy, "grpo.dynamic_sampling=true", "grpo.max_refill=0", "grpo.mask_truncated=false")
    cfg.rewards = {"grpo_half_flat:reward": 1.0}
    trainer = GRPOTrainer(cfg, tmp_path / "ds", progress=False)
    record = trainer.train_step()
    assert record["frac_zero_std"] >= 0.5 and record["trained_rows"] in (0, 4)

    # a random model never stops within 6 tokens: every completion is truncated, so no token has a loss
    trainer = GRPOTrainer(make_cfg(policy, "grpo.max_new_tokens=3"), tmp_path / "trunc", progress=False)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    record = trainer.train_step()
    assert record["truncated"] == 1.0 and record["grad_norm"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_bad_input(policy, tmp_path):
    no_tokenizer = tmp_path / "no_tok"
    shutil.copytree(policy, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        GRPOTrainer(make_cfg(no_tokenizer), tmp_path / "a", progress=False)
    trainer = GRPOTrainer(make_cfg(policy), tmp_path / "b", progress=False)
    long = type(trainer.task.eval_set()[0])("What is " + "1+" * 200 + "1?", "201")
    with pytest.raises(ValueError, match="context"):
        trainer.prompt_ids([long])
    with pytest.raises(ValueError, match="already holds"):
        GRPOTrainer(make_cfg(policy), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="group_size"):
        make_cfg(policy, "grpo.group_size=1")


def test_cli_grpo_and_resume(policy, tmp_path, capsys, one_thread):
    out = tmp_path / "rl"
    assert cli.main(["grpo", "--model", str(policy), "--task", "arithmetic", "--out", str(out), "--no-progress",
                     "--set", "run.steps=2", "--set", "grpo.prompts_per_step=2", "--set", "grpo.group_size=2",
                     "--set", "grpo.max_new_tokens=4", "--set", "grpo.eval_size=4", "--set", "run.threads=1"]) == 0
    text = capsys.readouterr().out
    assert "held-out accuracy" in text and "accuracy.png" in text
    assert json.loads((out / "grpo_config.json").read_text())["grpo"]["group_size"] == 2
    assert (out / "final" / "config.json").is_file() and (out / "plots" / "reward.png").is_file()
    assert cli.main(["grpo", "--resume", str(out), "--set", "run.steps=3", "--no-progress", "--no-plots"]) == 0
    assert [r["step"] for r in read_metrics(out) if r["kind"] == "train"] == [1, 2, 3]
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "1+1?", "answer": 2}\n{"prompt": 3}\n')
    assert cli.main(["grpo", "--out", str(tmp_path / "x"), "--model", str(policy), "--data", str(bad)]) == 2
    assert "prompts.jsonl:2" in capsys.readouterr().err
