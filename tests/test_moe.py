"""DeepSeekMoE routing and grouped experts against independent references."""

import pytest
import torch
from conftest import randomize_norms_and_bias

from seekformer import ModelConfig, Transformer
from seekformer.model.moe import MoE, Router, RouterOutput


def test_deepseekmoe_v1_without_shared_experts_matches_mixtral():
    """DeepSeekMoE (V1) = MHA + softmax top-k experts; with no shared experts and normalised top-k
    weights it is exactly Mixtral's architecture, so transformers' Mixtral is an oracle."""
    from transformers import MixtralConfig, MixtralForCausalLM

    reference = MixtralForCausalLM(MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=256)).eval()
    randomize_norms_and_bias(reference)
    config = ModelConfig.from_hf(dict(
        model_type="deepseek", vocab_size=128, hidden_size=64, intermediate_size=999, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=0, first_k_dense_replace=0, norm_topk_prob=True,
        max_position_embeddings=256))
    ours = Transformer(config).eval()
    ours.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 128, (2, 64))
    with torch.no_grad():
        assert (ours(ids) - reference(ids).logits).abs().max() <= 1e-4


def test_grouped_experts_equal_a_per_token_float64_loop():
    config = ModelConfig.preset("tiny-v3", hidden_size=32, moe_intermediate_size=16)
    moe = MoE(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(50, 32)
    route = moe.gate(x)
    got = moe.experts(x, route)
    gu, down = moe.experts.gate_up_proj.double(), moe.experts.down_proj.double()
    expected = torch.zeros(50, 32, dtype=torch.float64)
    for t in range(50):
        for slot in range(route.indices.shape[1]):
            e = route.indices[t, slot].item()
            gate, up = (gu[e] @ x[t].double()).chunk(2)
            expected[t] += route.weights[t, slot].double() * (down[e] @ (torch.nn.functional.silu(gate) * up))
    assert torch.allclose(got.double(), expected, atol=1e-5)


def _route_by_hand(scores, bias, n_group, topk_group, top_k, scaling, normalise):
    """V3 routing for one token with plain Python lists."""
    biased = [s + b for s, b in zip(scores, bias)]
    size = len(scores) // n_group
    group_score = [sum(sorted(biased[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
    kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
    allowed = [i for g in kept for i in range(g * size, (g + 1) * size)]
    chosen = sorted(allowed, key=lambda i: -biased[i])[:top_k]
    weights = [scores[i] for i in chosen]
    if normalise:
        weights = [w / sum(weights) for w in weights]
    return {i: w * scaling for i, w in zip(chosen, weights)}


def test_v3_router_equals_hand_computed_selection():
    config = ModelConfig.preset("tiny-v3", hidden_size=16, n_routed_experts=8, n_group=4, topk_group=2,
                                num_experts_per_tok=3)
    router = Router(config)
    torch.nn.init.normal_(router.weight, 0, 1.0)
    router.e_score_correction_bias.copy_(torch.randn(8) * 0.3)
    x = torch.randn(20, 16)
    out = router(x)
    scores = torch.sigmoid(x.double() @ router.weight.double().T)
    for t in range(20):
        expected = _route_by_hand(scores[t].tolist(), router.e_score_correction_bias.tolist(), 4, 2, 3, 2.5, True)
        got = dict(zip(out.indices[t].tolist(), out.weights[t].tolist()))
        assert got.keys() == expected.keys()
        for i in got:
            assert got[i] == pytest.approx(expected[i], rel=1e-5)
    assert torch.equal(out.counts, torch.bincount(out.indices.flatten(), minlength=8))
    assert torch.allclose(out.scores.double(), scores, atol=1e-6)


def test_moe_layer_placement_follows_first_k_dense_and_frequency():
    config = ModelConfig.preset("tiny-moe", num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    model = Transformer(config)
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["MLP", "MLP", "MoE", "MLP", "MoE", "MLP"]


def test_tokens_per_expert_accumulate_only_in_training():
    model = Transformer(ModelConfig.preset("tiny-v3", num_nextn_predict_layers=0))
    moe = model.model.layers[1].mlp
    ids = torch.randint(0, 1024, (2, 16))
    model.eval()
    with torch.no_grad():
        model(ids)
    assert moe.tokens_per_expert.sum() == 0
    model.train()
    model(ids)
    model(ids)
    assert moe.tokens_per_expert.sum() == 2 * 2 * 16 * model.config.num_experts_per_tok


def test_router_output_is_returned_for_balance_losses():
    model = Transformer(ModelConfig.preset("tiny-v2"))
    moe = model.model.layers[1].mlp
    moe.keep_route = True
    with torch.no_grad():
        model(torch.randint(0, 1024, (1, 8)))
    route = moe.last_route
    assert isinstance(route, RouterOutput)
    assert route.scores.shape == (8, 16) and torch.allclose(route.scores.sum(-1), torch.ones(8))
    assert route.indices.shape == route.weights.shape == (8, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_and_loop_implementations_agree_with_gradients(dtype):
    config = ModelConfig.preset("tiny-v3", hidden_size=32, moe_intermediate_size=16)
    moe = MoE(config).to(dtype)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(40, 32, dtype=dtype)
    results = {}
    for impl in ("loop", "grouped_mm"):
        moe.experts.implementation = impl
        xi = x.clone().requires_grad_()
        route = moe.gate(xi)
        y = moe.experts(xi, route)
        y.backward(torch.ones_like(y))
        results[impl] = (y.detach(), xi.grad, moe.experts.gate_up_proj.grad.clone())
        moe.zero_grad()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(results["loop"], results["grouped_mm"]):
        assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)
