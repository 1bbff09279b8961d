"""DeepSeek-V3 load balancing: sequence-wise and expert-level losses, MaxVio, the bias update."""

from __future__ import annotations

import pytest
import torch

from seekformer import ModelConfig
from seekformer.model.moe import MoE, RouterOutput
from seekformer.training.balance import (
    add_loads,
    expert_balance_loss,
    max_violation,
    sequence_balance_loss,
    update_bias,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _route(scores: list[list[float]], indices: list[list[int]]) -> RouterOutput:
    s = torch.tensor(scores, requires_grad=True)
    idx = torch.tensor(indices)
    counts = torch.bincount(idx.flatten(), minlength=s.shape[1])
    return RouterOutput(idx, torch.ones(idx.shape), s, counts)


# 2 sequences x 2 tokens, 4 experts, top-2; sigmoid-like affinities (rows do not sum to 1)
SCORES = [[0.8, 0.4, 0.6, 0.2], [0.5, 0.5, 0.5, 0.5], [0.9, 0.1, 0.1, 0.9], [0.3, 0.6, 0.2, 0.9]]
INDICES = [[0, 2], [1, 2], [0, 3], [3, 1]]


def test_sequence_balance_loss_equals_hand_computation():
    # sequence 0 (tokens 0, 1): counts [1, 1, 2, 0]; f = 4 / (2 * 2) * counts = counts
    #   s' token 0 = [0.8, 0.4, 0.6, 0.2] / 2.0 = [0.4, 0.2, 0.3, 0.1]; token 1 = [0.25] * 4
    #   P = [0.325, 0.225, 0.275, 0.175]; sum f P = 0.325 + 0.225 + 0.55 = 1.1
    # sequence 1 (tokens 2, 3): counts [1, 1, 0, 2]
    #   s' token 2 = [0.45, 0.05, 0.05, 0.45]; token 3 = [0.15, 0.3, 0.1, 0.45]
    #   P = [0.3, 0.175, 0.075, 0.45]; sum f P = 0.3 + 0.175 + 0.9 = 1.375
    alpha = 0.01
    loss = sequence_balance_loss(_route(SCORES, INDICES), batch_size=2, alpha=alpha)
    assert loss.item() == pytest.approx(alpha * (1.1 + 1.375) / 2, rel=1e-6)


def test_expert_balance_loss_equals_hand_computation():
    # whole batch: counts [2, 2, 2, 2] -> f = 4 / (2 * 4) * 2 = 1 for every expert, and sum_i P_i = 1
    route = _route(SCORES, INDICES)
    assert expert_balance_loss(route, alpha=0.5).item() == pytest.approx(0.5, rel=1e-6)
    # skewed: every token picks experts 0 and 1 -> f = [2, 2, 0, 0]; P_0 + P_1 from the normalised scores
    skewed = _route(SCORES, [[0, 1]] * 4)
    p = torch.tensor(SCORES) / torch.tensor(SCORES).sum(-1, keepdim=True)
    expected = 2 * (p[:, 0].mean() + p[:, 1].mean())
    assert expert_balance_loss(skewed, alpha=1.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_balance_loss_gradient_flows_through_scores_only():
    route = _route(SCORES, INDICES)
    sequence_balance_loss(route, batch_size=2, alpha=1.0).backward()
    grad = route.scores.grad
    assert grad is not None and torch.isfinite(grad).all()
    # f is a constant: d/ds of sum_i f_i P_i for token t of sequence b is
    # f_i / (T * S_t) - sum_j f_j s'_j,t / (T * S_t), with S_t = sum_j s_j,t
    s = torch.tensor(SCORES)
    f = torch.tensor([[1.0, 1, 2, 0], [1.0, 1, 0, 2]]).repeat_interleave(2, dim=0)  # per token's sequence
    total = s.sum(-1, keepdim=True)
    expected = (f - (f * s / total).sum(-1, keepdim=True)) / (2 * total) / 2  # mean over 2 sequences
    torch.testing.assert_close(grad, expected)


def test_balanced_routing_gives_alpha():
    # each of 4 tokens of one sequence picks a distinct pair so that every expert is chosen twice,
    # with uniform scores: f_i = 1, P_i = 1/E -> loss = alpha
    route = _route([[0.5] * 4] * 4, [[0, 1], [2, 3], [0, 2], [1, 3]])
    assert sequence_balance_loss(route, batch_size=1, alpha=0.3).item() == pytest.approx(0.3)


def test_max_violation_hand_values():
    assert max_violation(torch.tensor([3, 1, 2, 2])) == pytest.approx(0.5)
    assert max_violation(torch.tensor([5, 5, 5, 5])) == 0.0
    assert max_violation(torch.tensor([8, 0, 0, 0])) == pytest.approx(3.0)
    assert max_violation(torch.zeros(4, dtype=torch.long)) == 0.0


def test_update_bias_direction():
    moe = MoE(ModelConfig.preset("tiny-v3", n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2))
    update_bias(moe, torch.tensor([4, 0, 2, 2]), gamma=0.1)
    assert moe.gate.e_score_correction_bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])


def test_bias_update_needs_a_bias():
    moe = MoE(ModelConfig.preset("tiny-v2"))
    with pytest.raises(ValueError, match="noaux_tc"):
        update_bias(moe, torch.ones(16), 0.001)


def test_step_loads_sum_micro_batches():
    moe = MoE(ModelConfig.preset("tiny-v3")).train()
    total = torch.zeros(16, dtype=torch.long)
    loads = {}
    for _ in range(3):  # three micro-batches of one optimizer step
        _, route = moe(torch.randn(2, 8, 128))
        total += torch.bincount(route.indices.flatten(), minlength=16)
        loads = add_loads(loads, {"m": route.counts})
    assert torch.equal(loads["m"], total) and loads["m"].sum() == 3 * 16 * 4


def test_bias_update_balances_a_skewed_router():
    """A router that sends most tokens to three experts is brought near balance by the bias alone."""
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny-v3")  # 16 experts top-4, 4 groups keep 2, sigmoid + bias
    moe = MoE(config).train()
    direction = torch.randn(config.hidden_size)
    with torch.no_grad():
        torch.nn.init.normal_(moe.gate.weight, 0.0, 0.1)
        moe.gate.weight[:3] += 0.1 * direction  # experts 0-2 get a high affinity for every token
    gen = torch.Generator().manual_seed(1)

    def run(steps: int, gamma: float) -> list[float]:
        history = []
        for _ in range(steps):
            tokens = torch.randn(1024, config.hidden_size, generator=gen) + direction  # a fresh batch each step
            with torch.no_grad():
                loads = moe(tokens)[1].counts
            history.append(max_violation(loads))
            if gamma:
                update_bias(moe, loads, gamma)
        return history

    frozen = run(20, gamma=0.0)
    assert min(frozen) > 2.5  # experts 0-2 serve (nearly) every token: 4x the mean load, MaxVio 3
    balanced = run(300, gamma=0.003)
    late = balanced[-50:]
    assert sum(late) / len(late) < 0.6  # five times closer to balance
    bias = moe.gate.e_score_correction_bias
    assert bias[:3].max() < bias[3:].min()  # the favoured experts were pushed down, the rest up
