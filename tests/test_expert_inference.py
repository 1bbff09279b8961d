"""The CPU experts' inference path for a few rows per expert (`few_row_experts`, a decode step)
against a per-token float64 loop, in both of its forms (a loop over the busy experts, and two
batched products when nearly every expert is busy)."""

import pytest
import torch

from seekformer import ModelConfig
from seekformer.model import expert_kernels
from seekformer.model.moe import Experts, RouterOutput


def _case(all_busy: bool, tokens: int = 12, n_experts: int = 8, top_k: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    config = ModelConfig.preset("tiny-v3", hidden_size=16, moe_intermediate_size=8, n_routed_experts=n_experts,
                                num_experts_per_tok=top_k, n_group=1, topk_group=1)
    experts = Experts(config)
    experts.implementation = "loop"
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen) * 0.4)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen) * 0.4)
    used = torch.arange(n_experts) if all_busy else torch.tensor([0, 1, 2, 4, 5])  # 3, 6, 7 idle
    indices = torch.stack([used[torch.randperm(len(used), generator=gen)[:top_k]] for _ in range(tokens)])
    if all_busy:
        indices[: n_experts // top_k + 1].view(-1)[:n_experts] = torch.arange(n_experts)  # each expert once at least
    weights = torch.rand(tokens, top_k, generator=gen) + 0.1
    x = torch.randn(tokens, 16, generator=gen)
    return experts, indices, weights, x


def _reference(experts, indices, weights, x):
    gate_up, down = experts.gate_up_proj.detach().double(), experts.down_proj.detach().double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(indices.shape[1]):
            e = int(indices[t, k])
            gate, up = (gate_up[e] @ x[t].double()).chunk(2)
            out[t] += weights[t, k].double() * (down[e] @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("all_busy", [False, True])
def test_few_row_experts_equal_a_float64_loop(dtype, all_busy, monkeypatch):
    experts, indices, weights, x = _case(all_busy)
    expected = _reference(experts, indices, weights, x)
    experts.to(dtype)
    batched_calls = []
    original = expert_kernels._batched_expert_products
    monkeypatch.setattr(expert_kernels, "_batched_expert_products",
                        lambda *a: batched_calls.append(1) or original(*a))
    counts = torch.bincount(indices.flatten(), minlength=experts.n_experts)
    with torch.no_grad():
        got = experts(x.to(dtype), RouterOutput(indices, weights, torch.zeros(x.shape[0], experts.n_experts),
                                                counts))
        # the training path (hand-written backward) computes the same forward
        with torch.enable_grad():
            looped = experts(x.to(dtype).requires_grad_(), RouterOutput(
                indices, weights, torch.zeros(x.shape[0], experts.n_experts), counts))
    assert len(batched_calls) == int(all_busy)  # the batched form only when nearly every expert is busy
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.double() - expected).abs().max() <= tol * expected.abs().max()
    assert (got.double() - looped.detach().double()).abs().max() <= tol * expected.abs().max()
