"""Blocked causal attention (CPU fast path) against a float64 softmax computed here."""

import pytest
import torch

from seekformer import ModelConfig, Transformer
from seekformer.model import blocked_attention
from seekformer.model.blocked_attention import blocked_causal_attention, use_blocked_attention

# float32 products over at most 256 keys against float64: the largest gradient error measured in these
# tests is 7.8e-7 of the compared tensor's largest entry (about 7 float32 ulps); the tolerance leaves
# twice that. A backward whose softmax scale is off by 3e-6 fails it (the absolute 5e-6 used before let
# two of those cases through) and one that drops the scale fails by six orders of magnitude.
GRAD_TOL = 1.5e-6


def assert_close_to_float64(got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    """max |got - want| <= GRAD_TOL * max |want|: a tolerance relative to the tensor's own scale."""
    error, scale = (got.double() - want).abs().max().item(), want.abs().max().item()
    assert error <= GRAD_TOL * scale, f"{name}: error {error:.2e} > {GRAD_TOL:g} x scale {scale:.3g}"


def reference_attention(q, k, v, scale):
    q, k, v = q.double(), k.double(), v.double()
    T = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * scale
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1) @ v


def random_qkv(B=2, H=3, T=200, D=24, Dv=16, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, T, d, generator=gen).to(dtype) for d in (D, D, Dv)]


@pytest.mark.parametrize("block", [64, 128, 256])
def test_forward_and_gradients_match_float64(block):
    q, k, v = (t.requires_grad_() for t in random_qkv())
    grad = torch.randn(2, 3, 200, 16, generator=torch.Generator().manual_seed(1))
    out = blocked_causal_attention(q, k, v, 0.3, block=block)
    out.backward(grad)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*leaves, 0.3)
    expected.backward(grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)
    for name, got, want in zip("qkv", (q.grad, k.grad, v.grad), leaves):
        assert_close_to_float64(got, want.grad, name)


def test_bf16_autocast_runs_in_bf16_with_bf16_sized_error():
    q, k, v = (t.requires_grad_() for t in random_qkv())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = blocked_causal_attention(q, k, v, 0.3)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32  # flows back through the cast to the fp32 leaves
    expected = reference_attention(q, k, v, 0.3)
    assert (out.double() - expected).abs().max() < 3e-2
    assert (out.double() - expected).abs().max() > 1e-4  # it really computed in bf16


def test_no_grad_path_equals_autograd_path():
    q, k, v = random_qkv()
    with torch.no_grad():
        plain = blocked_causal_attention(q, k, v, 0.3)
    with_grad = blocked_causal_attention(q.requires_grad_(), k, v, 0.3)
    assert torch.equal(plain, with_grad.detach())


def test_dispatch_only_plain_causal_cpu_sequences_within_limits(monkeypatch):
    q, k, v = random_qkv()
    assert use_blocked_attention(q, k, v, dropout=0.0)
    assert not use_blocked_attention(q, k, v, dropout=0.1)
    assert not use_blocked_attention(q[..., :1, :], k, v, dropout=0.0)  # a decode step: queries != keys
    long_q = torch.zeros(1, 1, blocked_attention.MAX_TOKENS + 1, 8)
    assert not use_blocked_attention(long_q, long_q, long_q, dropout=0.0)
    long_bf16 = long_q.bfloat16()
    assert use_blocked_attention(long_bf16, long_bf16, long_bf16, dropout=0.0)  # a bf16 prefill: any length
    assert not use_blocked_attention(long_bf16.requires_grad_(), long_bf16, long_bf16, dropout=0.0)
    half = [t.half() for t in (q, k, v)]
    assert not use_blocked_attention(*half, dropout=0.0)  # fp16 scores would overflow: SDPA
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert use_blocked_attention(*half, dropout=0.0)  # products in bf16
    monkeypatch.setattr(blocked_attention, "MAX_SAVED_BYTES", 1000)
    assert use_blocked_attention(q, k, v, dropout=0.0)  # no grad needed: nothing is kept
    assert not use_blocked_attention(q, k, v.requires_grad_(), dropout=0.0)


@pytest.mark.parametrize("T", [2, 128, 129, 256])
@pytest.mark.parametrize("needs", ["qkv", "q", "v"])
def test_gradients_at_block_boundaries_and_for_some_inputs_only(T, needs):
    q, k, v = random_qkv(B=1, H=2, T=T)
    leaves = dict(zip("qkv", (q, k, v)))
    for name in needs:
        leaves[name].requires_grad_()
    grad = torch.randn(1, 2, T, 16, generator=torch.Generator().manual_seed(2))
    blocked_causal_attention(q, k, v, 0.3).backward(grad)
    ref = [t.detach().double().requires_grad_(name in needs) for name, t in leaves.items()]
    reference_attention(*ref, 0.3).backward(grad.double())
    for (name, got), want in zip(leaves.items(), ref):
        if name in needs:
            assert_close_to_float64(got.grad, want.grad, name)
        else:
            assert got.grad is None


def test_bf16_error_is_of_the_order_of_sdpa_fused_kernel():
    q, k, v = (t.requires_grad_() for t in random_qkv(T=256, D=96, Dv=64))
    grad = torch.randn(2, 3, 256, 64, generator=torch.Generator().manual_seed(1))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = reference_attention(*leaves, 96**-0.5)
    expected.backward(grad.double())

    def errors(fn):
        for t in (q, k, v):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn()
        out.float().backward(grad)
        return [(a.double() - b).abs().max().item()
                for a, b in zip((out, q.grad, k.grad, v.grad), (expected, *(t.grad for t in leaves)))]

    ours = errors(lambda: blocked_causal_attention(q, k, v, 96**-0.5))
    sdpa = errors(lambda: torch.nn.functional.scaled_dot_product_attention(  # V padded: the fused kernel
        q, k, torch.nn.functional.pad(v, (0, 32)), is_causal=True, scale=96**-0.5)[..., :64])
    for mine, theirs in zip(ours, sdpa):
        assert mine <= 2 * theirs


def test_model_gradients_equal_the_sdpa_path(monkeypatch):
    config = ModelConfig.preset("tiny-v3")
    torch.manual_seed(0)
    model = Transformer(config)
    ids = torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(ids).float().logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    blocked = loss_and_grads()
    monkeypatch.setattr(blocked_attention, "MAX_TOKENS", 0)  # every call through SDPA
    fused = loss_and_grads()
    torch.testing.assert_close(blocked[0], fused[0], rtol=0, atol=1e-5)
    assert blocked[1].keys() == fused[1].keys()
    for name in fused[1]:
        torch.testing.assert_close(blocked[1][name], fused[1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("T, block", [(300, 256), (200, 64), (129, 128), (100, 256)])
def test_bf16_inference_forward_error_is_of_the_order_of_sdpa_fused_kernel(T, block):
    """The bf16 no-grad forward (bf16 scores and probabilities, scale folded into q) against float64:
    2 rows x 3 heads one at a time over several blocks (a last block of one row), or all at once in
    a single block. Inputs laid out [B, T, H, D] and transposed, as MLA passes them."""
    q, k, v = random_qkv(T=T, D=96, Dv=64)
    expected = reference_attention(q, k, v, 96**-0.5)
    bf16 = [t.bfloat16().transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    with torch.no_grad():
        ours = blocked_causal_attention(*bf16, 96**-0.5, block=block)
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            *bf16[:2], torch.nn.functional.pad(bf16[2], (0, 32)), is_causal=True, scale=96**-0.5)[..., :64]
    assert ours.dtype == torch.bfloat16
    mine, theirs = ((got.double() - expected).abs().max().item() for got in (ours, sdpa))
    assert mine <= 2.5 * theirs
    # a wrong mask, scale or block edge gives errors of the order of the outputs themselves
    assert mine < 0.02 * expected.abs().max().item()


def test_bf16_prefill_beyond_max_tokens_takes_the_lean_forward_with_grouped_heads(monkeypatch):
    """`attend` on a long bf16 causal sequence without gradients (8 query heads over 2 key/value
    heads, past MAX_TOKENS and off the block grid) goes through the bf16 forward, within 2.5x the
    fused kernel's error against float64."""
    from seekformer.model.attention import attend

    calls = []
    lean = blocked_attention._forward_bf16
    monkeypatch.setattr(blocked_attention, "_forward_bf16", lambda *a: calls.append(a[0].shape) or lean(*a))
    T = blocked_attention.MAX_TOKENS + 6
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, T, 32, generator=gen) for h in (8, 2, 2))
    expected = reference_attention(q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1), 0.2)
    bf16 = [t.bfloat16() for t in (q, k, v)]
    with torch.inference_mode():
        ours = attend(*bf16, 0.2, None)
        sdpa = torch.nn.functional.scaled_dot_product_attention(*bf16, is_causal=True, scale=0.2, enable_gqa=True)
    assert calls == [(1, 8, T, 32)]
    mine, theirs = ((got.double() - expected).abs().max().item() for got in (ours, sdpa))
    assert mine <= 2.5 * theirs


def test_bf16_model_prefill_error_is_that_of_the_sdpa_path(monkeypatch):
    """A bf16 MLA model's prefill (cache, last token only: what `generate` runs) over 300 tokens, with
    attention through the bf16 blocked forward or forced through SDPA's fused kernel: against the same
    weights in float64, the two errors are alike."""
    from seekformer.inference import KVCache
    from seekformer.model import attention

    config = ModelConfig.preset("tiny-v3")
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():  # queries and keys large enough for scores of a few units: attention that matters
        for layer in model.model.layers:
            for proj in ("q_proj", "q_b_proj", "kv_b_proj"):
                if hasattr(layer.self_attn, proj):
                    getattr(layer.self_attn, proj).weight.mul_(12)
    ids = torch.randint(0, config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0))
    last = torch.tensor([299])

    def prefill(m):
        with torch.inference_mode():
            h = m.hidden_states(ids, cache=KVCache.for_model(m, 1), rows=last)
            return m.lm_head(h).double()

    expected = prefill(model.double())
    blocked = prefill(model.bfloat16())
    monkeypatch.setattr(attention, "use_blocked_attention", lambda *a: False)
    fused = prefill(model)
    error, fused_error = ((got - expected).abs().max().item() for got in (blocked, fused))
    assert error <= 2 * fused_error
    assert (blocked - fused).abs().max().item() > 0  # the two paths really differ


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_bf16_forward_shared_out_among_pool_threads_equals_one_thread(mode):
    """The heads run on pool threads (one intra-op thread each) exactly as on the caller's one
    thread, under inference mode or no_grad, and the caller's thread count is left alone."""
    q, k, v = (t.bfloat16() for t in random_qkv(T=300))
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 4):
            torch.set_num_threads(threads)
            with getattr(torch, mode)():
                results[threads] = blocked_causal_attention(q, k, v, 0.3, block=128)
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[1], results[4])
    assert "seekformer-attention" in " ".join(t.name for t in __import__("threading").enumerate())


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_bf16_forward_in_a_forked_child_after_the_parent_used_its_pool():
    """A child forked after the parent's pool threads ran gets its own pool instead of waiting on
    threads it does not have. (Tensors small enough that no operation opens an OpenMP team: one
    opened in a child after the parent's can hang in libgomp, with or without this path.)"""
    import os
    import time

    q, k, v = (t.bfloat16() for t in random_qkv(B=1, T=300))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            expected = blocked_causal_attention(q, k, v, 0.3, block=128)
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: same result, then report and leave without pytest's teardown
                ok = torch.equal(blocked_causal_attention(q, k, v, 0.3, block=128), expected)
                os.write(write, b"1" if ok else b"0")
                os._exit(0)
            os.close(write)
            deadline = time.monotonic() + 20
            while os.waitpid(pid, os.WNOHANG) == (0, 0):  # a child stuck on inherited threads never ends
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    pytest.fail("the forked child did not finish within 20 s")
                time.sleep(0.05)
            assert os.read(read, 1) == b"1"
    finally:
        torch.set_num_threads(before)
