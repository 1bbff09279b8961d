"""DeepSeekMoE routing and grouped experts against independent references."""

import contextlib

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


@pytest.mark.parametrize("top_k", [3, 1])
def test_v3_router_equals_hand_computed_selection(top_k):
    """With one expert per token the normalised gate is exactly routed_scaling_factor (2.5)."""
    config = ModelConfig.preset("tiny-v3", hidden_size=16, n_routed_experts=8, n_group=4, topk_group=2,
                                num_experts_per_tok=top_k)
    router = Router(config)
    torch.nn.init.normal_(router.weight, 0, 1.0)
    router.e_score_correction_bias.copy_(torch.randn(8) * 0.3)
    x = torch.randn(20, 16)
    out = router(x)
    scores = torch.sigmoid(x.double() @ router.weight.double().T)
    for t in range(20):
        expected = _route_by_hand(scores[t].tolist(), router.e_score_correction_bias.tolist(), 4, 2, top_k, 2.5,
                                  True)
        got = dict(zip(out.indices[t].tolist(), out.weights[t].tolist()))
        assert got.keys() == expected.keys()
        for i in got:
            assert got[i] == pytest.approx(expected[i], rel=1e-5)
    assert torch.equal(out.counts, torch.bincount(out.indices.flatten(), minlength=8))
    assert torch.allclose(out.scores.double(), scores, atol=1e-6)


def test_softmax_router_leaves_a_single_expert_gate_unnormalised():
    """DeepSeek's V1/V2 code normalises the top-k weights only for k > 1: a top-1 softmax gate stays
    the expert's probability (times the scaling factor), so the router still gets a gradient."""
    config = ModelConfig.preset("tiny-v2", hidden_size=16, num_experts_per_tok=1, norm_topk_prob=True,
                                routed_scaling_factor=2.0)
    router = Router(config)
    torch.nn.init.normal_(router.weight, 0, 1.0)
    x = torch.randn(10, 16)
    out = router(x)
    probs = (x.double() @ router.weight.double().T).softmax(-1)
    torch.testing.assert_close(out.weights.double(), 2.0 * probs.gather(1, out.indices), rtol=1e-6, atol=0)


def test_moe_layer_placement_follows_first_k_dense_and_frequency():
    config = ModelConfig.preset("tiny-moe", num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    model = Transformer(config)
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["MLP", "MLP", "MoE", "MLP", "MoE", "MLP"]


def test_routing_is_returned_by_the_forward_not_kept():
    """Each MoE layer's routing comes back from the forward (in training and in inference alike) and
    nothing is left in the modules: two forwards return two separate counts."""
    model = Transformer(ModelConfig.preset("tiny-v3", num_hidden_layers=3, num_nextn_predict_layers=1))
    ids = torch.randint(0, 1024, (2, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):
        routes = {}
        h = model.hidden_states(ids, routes=routes)
        model.mtp_hidden_states(h, ids, routes=routes)
        assert sorted(routes) == ["layers.1", "layers.2", "mtp.0"]  # layer 0 is dense
        for name, route in routes.items():
            n = 2 * (15 if name == "mtp.0" else 16)  # MTP depth 1: one position less
            assert route.counts.sum() == n * model.config.num_experts_per_tok
            assert torch.equal(route.counts, torch.bincount(route.indices.flatten(), minlength=16))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_router_output_is_returned_for_balance_losses():
    model = Transformer(ModelConfig.preset("tiny-v2"))
    routes = {}
    with torch.no_grad():
        model.hidden_states(torch.randint(0, 1024, (1, 8)), routes=routes)
    route = routes["layers.1"]
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


def _experts_case(n_experts=8, top_k=3, hidden=16, inter=8, tokens=24, seed=0):
    """An Experts module and a hand-made route in which experts 3, 6 and 7 get no tokens."""
    from seekformer.model.moe import Experts

    gen = torch.Generator().manual_seed(seed)
    config = ModelConfig.preset("tiny-v3", hidden_size=hidden, moe_intermediate_size=inter,
                                n_routed_experts=n_experts, num_experts_per_tok=top_k, n_group=1, topk_group=1)
    experts = Experts(config)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen) * 0.4)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen) * 0.4)
    used = torch.tensor([0, 1, 2, 4, 5])
    indices = torch.stack([used[torch.randperm(len(used), generator=gen)[:top_k]] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen) + 0.1
    x = torch.randn(tokens, hidden, generator=gen)
    return experts, indices, weights, x


def _reference_float64(experts, indices, weights, x):
    """sum_k w[t, k] * down_e(silu(gate_e x_t) * up_e x_t), token by token, in float64 with autograd."""
    gate_up = experts.gate_up_proj.detach().double().requires_grad_()
    down = experts.down_proj.detach().double().requires_grad_()
    xd, wd = x.detach().double().requires_grad_(), weights.detach().double().requires_grad_()
    rows = []
    for t in range(x.shape[0]):
        row = 0
        for k in range(indices.shape[1]):
            e = int(indices[t, k])
            gate, up = (gate_up[e] @ xd[t]).chunk(2)
            row = row + wd[t, k] * (down[e] @ (torch.nn.functional.silu(gate) * up))
        rows.append(row)
    return torch.stack(rows), (xd, wd, gate_up, down)


def _run_experts(experts, indices, weights, x, grad_out, autocast=False):
    xi, wi = x.clone().requires_grad_(), weights.clone().requires_grad_()
    route = RouterOutput(indices, wi, torch.zeros(x.shape[0], experts.n_experts),
                         torch.bincount(indices.flatten(), minlength=experts.n_experts))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = experts(xi, route)
    y.backward(grad_out)
    grads = [xi.grad, wi.grad, experts.gate_up_proj.grad, experts.down_proj.grad]
    grads = [g.clone() if g is not None else None for g in grads]
    experts.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("autocast", [False, True])
def test_looped_experts_gradients_equal_a_float64_reference(autocast):
    """The hand-written backward of the CPU expert loop against autograd through a per-token float64
    loop: inputs, routing weights and both stacked weights, with three experts receiving no token
    (their gradient rows must be exactly zero); under bf16 autocast within bf16 rounding."""
    experts, indices, weights, x = _experts_case()
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    expected, leaves = _reference_float64(experts, indices, weights, x)
    expected.backward(grad_out.double())
    experts.implementation = "loop"
    got, grads = _run_experts(experts, indices, weights, x, grad_out, autocast)
    tol = 2e-2 if autocast else 1e-5
    scale = expected.abs().max()
    assert (got.double() - expected.detach()).abs().max() <= tol * scale
    for name, grad, leaf in zip(("x", "weights", "gate_up_proj", "down_proj"), grads, leaves):
        assert grad.dtype == torch.float32, name
        err = (grad.double() - leaf.grad).abs().max() / leaf.grad.abs().max()
        assert err <= tol, f"{name}: relative error {err:.2e}"
    for idle in (3, 6, 7):
        assert torch.count_nonzero(grads[2][idle]) == 0 and torch.count_nonzero(grads[3][idle]) == 0
    # the same loop left to autograd agrees closely: the bf16 path rounds the same products
    experts.implementation = "autograd_loop"
    got_autograd, grads_autograd = _run_experts(experts, indices, weights, x, grad_out, autocast)
    assert torch.allclose(got, got_autograd, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads, grads_autograd):
        assert (a - b).abs().max() <= (1e-2 if autocast else 1e-5) * b.abs().max()


def test_looped_experts_gradcheck_float64():
    from seekformer.model.expert_kernels import LoopedExperts

    gen = torch.Generator().manual_seed(0)
    n_experts, top_k, hidden, inter, tokens = 4, 2, 5, 3, 6
    indices = torch.tensor([[0, 1], [1, 3], [0, 3], [3, 1], [0, 1], [1, 0]])  # expert 2 gets no token
    order = indices.flatten().argsort(stable=True)
    counts = torch.bincount(indices.flatten(), minlength=n_experts).tolist()
    x = torch.randn(tokens, hidden, dtype=torch.float64, generator=gen, requires_grad=True)
    slot_weights = torch.rand(tokens * top_k, dtype=torch.float64, generator=gen).requires_grad_()
    gate_up = torch.randn(n_experts, 2 * inter, hidden, dtype=torch.float64, generator=gen, requires_grad=True)
    down = torch.randn(n_experts, hidden, inter, dtype=torch.float64, generator=gen, requires_grad=True)

    def fn(x, slot_weights, gate_up, down):
        return LoopedExperts.apply(x, slot_weights, gate_up, down, order // top_k, counts, torch.float64, {})

    assert torch.autograd.gradcheck(fn, (x, slot_weights, gate_up, down))


def test_looped_experts_reuse_gradient_memory_only_when_nothing_holds_it():
    experts, indices, weights, x = _experts_case()
    experts.implementation = "loop"
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    _, (_, _, first, _) = _run_experts(experts, indices, weights, x, grad_out)

    def backward():
        xi = x.clone().requires_grad_()
        route = RouterOutput(indices, weights, torch.zeros(x.shape[0], 8), torch.bincount(indices.flatten(),
                                                                                           minlength=8))
        experts(xi, route).backward(grad_out)

    backward()
    pointer = experts.gate_up_proj.grad.data_ptr()
    assert torch.equal(experts.gate_up_proj.grad, first)
    backward()  # gradients kept (no zero_grad): they accumulate, the kept memory is not overwritten
    assert torch.allclose(experts.gate_up_proj.grad, 2 * first)
    held = experts.gate_up_proj.grad
    experts.zero_grad(set_to_none=True)
    backward()  # a tensor still holds the memory: fresh memory, `held` untouched
    assert experts.gate_up_proj.grad.data_ptr() != pointer and torch.allclose(held, 2 * first)
    del held
    experts.zero_grad(set_to_none=True)
    backward()
    backward_pointer = experts.gate_up_proj.grad.data_ptr()
    experts.zero_grad(set_to_none=True)
    backward()  # nothing holds it any more: the same memory again, with the right values
    assert experts.gate_up_proj.grad.data_ptr() == backward_pointer
    assert torch.equal(experts.gate_up_proj.grad, first)


def test_looped_experts_skip_gradients_of_frozen_weights():
    experts, indices, weights, x = _experts_case()
    experts.implementation = "loop"
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    _, full = _run_experts(experts, indices, weights, x, grad_out)
    experts.requires_grad_(False)
    _, frozen = _run_experts(experts, indices, weights, x, grad_out)
    assert frozen[2] is None and frozen[3] is None
    assert torch.equal(frozen[0], full[0]) and torch.equal(frozen[1], full[1])


def test_expert_spans_pad_each_expert_to_the_alignment():
    from seekformer.model.expert_kernels import expert_spans

    spans, n_rows = expert_spans([3, 0, 17, 16], align=16)
    assert [(s.expert, s.slot_start, s.count, s.row_start, s.padded) for s in spans] == [
        (0, 0, 3, 0, 16), (2, 3, 17, 16, 32), (3, 20, 16, 48, 16)]
    assert n_rows == 64
    spans, n_rows = expert_spans([3, 0, 17, 16], align=1)
    assert [(s.row_start, s.padded) for s in spans] == [(0, 3), (3, 17), (20, 16)] and n_rows == 36


def test_padded_bf16_experts_equal_the_unpadded_ones(monkeypatch):
    """The zero padding rows of the bf16 CPU path change no output or gradient: the same products
    with every expert's rows padded to 16 and with none (within bf16 rounding of the kernels)."""
    from seekformer.model import expert_kernels

    experts, indices, weights, x = _experts_case(tokens=40)
    experts.implementation = "loop"
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    padded = _run_experts(experts, indices, weights, x, grad_out, autocast=True)
    monkeypatch.setattr(expert_kernels, "row_alignment", lambda device, dtype: 1)
    unpadded = _run_experts(experts, indices, weights, x, grad_out, autocast=True)
    torch.testing.assert_close(padded[0], unpadded[0], rtol=1e-2, atol=1e-3)
    for got, want in zip(padded[1], unpadded[1]):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)


@contextlib.contextmanager
def _cuda_autocast_state(dtype):
    """CUDA autocast switched on as `torch.autocast("cuda")` would (its flags are thread state, which a
    machine without a GPU can set; the context manager itself refuses without one)."""
    enabled, previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", previous)


def test_expert_path_is_chosen_from_the_dtype_products_run_in():
    """Training on CUDA keeps the residual stream in float32 under bf16 autocast: the grouped GEMM must
    be chosen from the autocast dtype, not from the float32 input."""
    from seekformer.model.moe import Experts

    experts = Experts(ModelConfig.preset("tiny-v3"))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert experts.resolve_implementation(cuda, torch.bfloat16) == "grouped_mm"
    assert experts.resolve_implementation(cuda, torch.float32) == "loop"
    with _cuda_autocast_state(torch.bfloat16):
        assert experts.resolve_implementation(cuda, torch.float32) == "grouped_mm"
        assert experts.resolve_implementation(cpu, torch.float32) == "loop"  # autocast is per device
    with _cuda_autocast_state(torch.float16):
        assert experts.resolve_implementation(cuda, torch.float32) == "loop"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert experts.resolve_implementation(cpu, torch.float32) == "loop"  # CPU: the loop in bf16 and fp32
    experts.implementation = "autograd_loop"
    with _cuda_autocast_state(torch.bfloat16):
        assert experts.resolve_implementation(cuda, torch.float32) == "autograd_loop"  # forced stays forced


def test_grouped_experts_compute_in_the_autocast_dtype():
    """The grouped GEMM under bf16 autocast with float32 inputs and weights runs its products in bf16,
    as the reference loop does through autocast (CPU's grouped_mm stands in for CUDA's)."""
    experts, indices, weights, x = _experts_case(tokens=40)
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    results = {}
    for autocast in (False, True):
        for impl in ("grouped_mm", "autograd_loop"):
            experts.implementation = impl
            results[impl, autocast] = _run_experts(experts, indices, weights, x, grad_out, autocast)
    fp32 = results["autograd_loop", False][0]
    bf16_grouped, bf16_loop = results["grouped_mm", True][0], results["autograd_loop", True][0]
    scale = fp32.abs().max()
    assert (bf16_grouped - fp32).abs().max() > 1e-4 * scale  # really computed in bf16
    assert (bf16_grouped - bf16_loop).abs().max() <= 2e-2 * scale
    for got, want in zip(results["grouped_mm", True][1], results["autograd_loop", True][1]):
        assert got.dtype == want.dtype == torch.float32
        assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_grouped_path_reads_nothing_back_to_the_host():
    """MoE forward and backward through the grouped GEMM (float32 stream, bf16 autocast) on fake
    tensors, which hold no data: any read of values on the host (`.tolist()`, `.item()`, `bincount`
    sizing its output from the data) raises there. On CUDA each such read waits for the GPU."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    config = ModelConfig.preset("tiny-v3")
    with FakeTensorMode():
        moe = MoE(config).train()
        moe.experts.implementation = "grouped_mm"
        x = torch.randn(2, 16, config.hidden_size, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, route = moe(x)
        out.sum().backward()
        assert out.shape == x.shape and moe.experts.gate_up_proj.grad.shape == moe.experts.gate_up_proj.shape
        with pytest.raises(DataDependentOutputException):
            route.counts.tolist()  # the mode does catch host reads


def test_experts_compute_takes_rows_sorted_by_expert():
    """`Experts.compute` (the seam expert parallelism wraps): rows sorted by expert plus counts give
    each row its expert's output, whatever the implementation."""
    experts, indices, _, x = _experts_case()
    counts = torch.bincount(indices.flatten(), minlength=experts.n_experts)
    experts_of_rows = torch.repeat_interleave(torch.arange(experts.n_experts), counts)
    xs = x[torch.randint(0, x.shape[0], (len(experts_of_rows),), generator=torch.Generator().manual_seed(3))]
    gu, down = experts.gate_up_proj.detach().double(), experts.down_proj.detach().double()
    gate, up = torch.einsum("sih,sh->si", gu[experts_of_rows], xs.double()).chunk(2, dim=-1)
    expected = torch.einsum("shi,si->sh", down[experts_of_rows], torch.nn.functional.silu(gate) * up)
    for impl in ("loop", "grouped_mm", "autograd_loop"):
        with torch.no_grad():
            got = experts.compute(xs, counts, impl)
        assert (got.double() - expected).abs().max() <= 1e-5 * expected.abs().max(), impl


@pytest.mark.parametrize("autocast", [False, True])
def test_looped_experts_two_forwards_before_their_backwards(autocast):
    """The CPU loop keeps its row buffers and weight copies between calls: a second forward run before
    the first one's backward (two micro-batches, activation checkpointing) must not overwrite what
    the first saved. Outputs and gradients equal each forward + backward run alone."""
    experts, indices, weights, x = _experts_case(tokens=40)
    experts.implementation = "loop"
    gen = torch.Generator().manual_seed(2)
    x2, grad_out, grad_out2 = (torch.randn(x.shape, generator=gen) for _ in range(3))
    alone = [_run_experts(experts, indices, weights, xi, g, autocast) for xi, g in ((x, grad_out), (x2, grad_out2))]
    ys, inputs = [], []
    for xi in (x, x2):
        xi, wi = xi.clone().requires_grad_(), weights.clone().requires_grad_()
        route = RouterOutput(indices, wi, torch.zeros(x.shape[0], experts.n_experts),
                             torch.bincount(indices.flatten(), minlength=experts.n_experts))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ys.append(experts(xi, route))
        inputs.append((xi, wi))
    for k, (y, g) in enumerate(zip(ys, (grad_out, grad_out2))):
        y.backward(g)
        assert torch.equal(y.detach(), alone[k][0])
        assert torch.equal(inputs[k][0].grad, alone[k][1][0]) and torch.equal(inputs[k][1].grad, alone[k][1][1])
    # the weight gradients accumulated over both backwards
    for got, first, second in zip((experts.gate_up_proj.grad, experts.down_proj.grad), (alone[0][1][2], alone[0][1][3]),
                                  (alone[1][1][2], alone[1][1][3])):
        torch.testing.assert_close(got, first + second, rtol=1e-6, atol=1e-7)
