"""GRPO advantages and loss against hand-computed cases, TRL's own loss code, and float64 gradients."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from seekformer.training.grpo import group_advantages, grpo_loss, grpo_loss_stats

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


# ---------------------------------------------------------------------------- advantages
def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.5, unbiased std sqrt(1/3); group 2: all equal -> 0
    std = math.sqrt(1 / 3)
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4)
    got = group_advantages(rewards, 4)
    torch.testing.assert_close(got[:4], expected)
    assert torch.equal(got[4:], torch.zeros(4))
    torch.testing.assert_close(group_advantages(rewards, 4, "none"), torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]))
    batch_std = float(rewards.std())  # unbiased over all 8
    torch.testing.assert_close(group_advantages(rewards, 4, "batch"),
                               torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]) / (batch_std + 1e-4))


def _trl_advantages(rewards: torch.Tensor, group: int, scale: str) -> torch.Tensor:
    """TRL's GRPOTrainer computation (sum_then_normalize), with its own nanstd."""
    from trl.trainer.utils import nanstd

    mean = torch.nanmean(rewards.view(-1, group), dim=1).repeat_interleave(group)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    return adv / (std + 1e-4) if scale != "none" else adv


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale):
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randint(0, 3, (24,), generator=gen).float() + torch.rand(24, generator=gen).round()
    torch.testing.assert_close(group_advantages(rewards, 6, scale), _trl_advantages(rewards, 6, scale))


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(torch.ones(7), 4)
    with pytest.raises(ValueError, match="empty group"):
        group_advantages(torch.ones(0), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.ones(4), 4, "median")
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(4), 0)


# ---------------------------------------------------------------------------- loss
def _inputs(dtype=torch.float32, B=6, T=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    logp = old + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)  # ratios well past the clip
    ref = old + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 1, 5, 7, 2])[:B]
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()
    return [t.to(dtype) for t in (logp, old, ref, adv)] + [mask]


def test_grpo_loss_hand_computed():
    # one sequence of two tokens, A = 1: ratios e^0.5 (clipped at 1.2) and e^-0.1 (not clipped)
    logp, old = torch.tensor([[-0.5, -1.1]]), torch.tensor([[-1.0, -1.0]])
    mask, adv = torch.ones(1, 2), torch.tensor([1.0])
    expected = -(1.2 + math.exp(-0.1)) / 2
    for loss_type in LOSS_TYPES:
        torch.testing.assert_close(grpo_loss(logp, old, adv, mask, loss_type=loss_type), torch.tensor(expected))
    # negative advantage: min(-rho, -clip(rho)) picks the unclipped -e^0.5 and the clipped -0.8 floor
    # is not reached by e^-0.1; with eps_low = 0.05 the second ratio is clipped to 0.95
    got = grpo_loss(logp, old, -adv, mask, epsilon_low=0.05)
    torch.testing.assert_close(got, torch.tensor((math.exp(0.5) + 0.95) / 2))
    # k3 KL: ref = logp + d -> e^d - d - 1
    ref = logp + torch.tensor([[0.3, -0.2]])
    kl = ((math.exp(0.3) - 1.3) + (math.exp(-0.2) + 0.2 - 1)) / 2
    got = grpo_loss(logp, old, adv, mask, ref_logprobs=ref, beta=0.5)
    torch.testing.assert_close(got, torch.tensor(expected + 0.5 * kl))
    # dr_grpo divides by B * T, padding included; grpo averages each sequence first
    mask = torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(grpo_loss(logp, old, adv, mask, loss_type="dr_grpo"), torch.tensor(-1.2 / 2))
    torch.testing.assert_close(grpo_loss(logp, old, adv, mask, loss_type="grpo"), torch.tensor(-1.2))


class _Accelerator:
    num_processes = 1

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    gather_for_metrics = gather


def _trl_loss(logp, old, ref, adv, mask, loss_type, beta, eps_low, eps_high):
    """TRL 1.x GRPOTrainer._compute_loss run as is on given per-token log-probs: the model call is
    replaced by one that returns `logp`; every other line is TRL's."""
    from trl import GRPOTrainer

    T = logp.shape[1]
    state = SimpleNamespace(
        top_entropy_quantile=1.0, loss_type=loss_type, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, epsilon_low=eps_low, epsilon_high=eps_high,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        use_vllm=False, model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=T, accelerator=_Accelerator(), _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
    )
    inputs = {"prompt_ids": torch.zeros(logp.shape[0], 1, dtype=torch.long),
              "prompt_mask": torch.ones(logp.shape[0], 1, dtype=torch.long),
              "completion_ids": torch.zeros_like(mask), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    if beta:
        inputs["ref_per_token_logps"] = ref
    loss = GRPOTrainer._compute_loss(state, None, inputs)
    return loss, state._metrics["train"]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_matches_trl_and_float64_gradients(loss_type, beta):
    eps_low, eps_high = 0.2, 0.28
    logp, old, ref, adv, mask = _inputs(torch.float64)
    logp64 = logp.clone().requires_grad_()
    theirs, metrics = _trl_loss(logp64, old, ref, adv, mask, loss_type, beta, eps_low, eps_high)
    (grad64,) = torch.autograd.grad(theirs, logp64)

    logp32 = logp.float().requires_grad_()
    ours = grpo_loss(logp32, old.float(), adv.float(), mask, ref_logprobs=ref.float() if beta else None,
                     beta=beta, epsilon_low=eps_low, epsilon_high=eps_high, loss_type=loss_type)
    (grad32,) = torch.autograd.grad(ours, logp32)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), theirs.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad32.double(), grad64, atol=1e-6, rtol=1e-5)
    assert grad32[mask == 0].abs().max() == 0  # padding gets no gradient

    stats = grpo_loss_stats(logp32.detach(), old.float(), adv.float(), mask, ref_logprobs=ref.float(),
                            epsilon_low=eps_low, epsilon_high=eps_high)
    for ours_key, trl_key in (("clip_low", "clip_ratio/low_mean"), ("clip_high", "clip_ratio/high_mean"),
                              ("clip_region", "clip_ratio/region_mean")):
        assert stats[ours_key] == pytest.approx(metrics[trl_key][0], abs=1e-7)
    assert 0 < stats["clip_low"] and 0 < stats["clip_high"]  # the inputs exercise both clips
    if beta:
        assert stats["kl"] == pytest.approx(metrics["kl"][0], rel=1e-5)


def test_grpo_loss_normalizer_splits_a_batch():
    """dapo over micro-batches with the global token count sums to the whole batch's loss."""
    logp, old, ref, adv, mask = _inputs()
    whole = grpo_loss(logp, old, adv, mask)
    n = float(mask.sum())
    parts = sum(grpo_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], normalizer=n)
                for i in range(0, 6, 2))
    torch.testing.assert_close(parts, whole)


def test_grpo_loss_bad_input():
    logp, old, ref, adv, mask = _inputs()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, old, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old, adv[:3], mask)
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(logp, old, adv, mask[:, :3])
