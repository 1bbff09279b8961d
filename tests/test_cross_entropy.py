"""Chunked output-head cross-entropy and token log-probs against float64 logits and F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from seekformer.training import cross_entropy
from seekformer.training.cross_entropy import linear_cross_entropy, token_logprobs


def inputs(n=70, hidden=24, vocab=50, ignored=(3, 17, 69)):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, n // 2, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * 0.3
    t = torch.randint(0, vocab, (2, n // 2), generator=gen)
    t.view(-1)[list(ignored)] = -100
    return h, w, t


def reference(h, w, t, reduction, token_weights=None, upstream=None):
    """The loss and gradients of F.cross_entropy over full float64 logits."""
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    losses = F.cross_entropy((h64 @ w64.T).flatten(0, 1), t.flatten(), reduction="none").view(t.shape)
    kept = (t != -100).double()
    weights = kept if token_weights is None else kept * token_weights.double()
    if reduction == "none":
        loss = losses * weights
    elif reduction == "sum":
        loss = (losses * weights).sum()
    else:
        loss = (losses * weights).sum() / weights.sum()
    (loss * (1.0 if upstream is None else upstream.double())).sum().backward()
    return loss, h64.grad, w64.grad


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(cross_entropy, "MIN_CHUNK_ROWS", 16)  # 16-row chunks: 5 chunks, the last ragged
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", 16 * 50)


@pytest.mark.parametrize("recompute", [False, True], ids=["grads-in-forward", "recomputed"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_float64_over_several_chunks(small_chunks, monkeypatch, reduction, recompute):
    if recompute:
        monkeypatch.setattr(cross_entropy, "SAVED_WEIGHT_GRAD_BYTES", 0)
    h, w, t = inputs()
    h.requires_grad_()
    w.requires_grad_()
    loss = linear_cross_entropy(h, w, t, reduction=reduction)
    (3 * loss).backward()  # the upstream gradient scales both
    want, grad_h, grad_w = reference(h, w, t, reduction)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(h.grad.double(), 3 * grad_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), 3 * grad_w, rtol=1e-5, atol=1e-5)
    assert h.grad.view(-1, 24)[17].abs().sum() == 0  # an ignored row gets no gradient


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_token_weights_and_per_token_losses_match_float64(small_chunks, reduction):
    h, w, t = inputs()
    h.requires_grad_()
    w.requires_grad_()
    gen = torch.Generator().manual_seed(1)
    token_weights = torch.rand(t.shape, generator=gen)
    upstream = torch.randn(t.shape, generator=gen) if reduction == "none" else torch.tensor(0.7)
    loss = linear_cross_entropy(h, w, t, reduction=reduction, token_weights=token_weights)
    (loss * upstream).sum().backward()
    want, grad_h, grad_w = reference(h, w, t, reduction, token_weights, upstream)
    assert loss.shape == want.shape
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(h.grad.double(), grad_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), grad_w, rtol=1e-5, atol=1e-6)
    if reduction == "none":
        assert loss[t == -100].abs().sum() == 0


def test_recomputed_path_keeps_no_weight_sized_gradient(monkeypatch):
    """Above SAVED_WEIGHT_GRAD_BYTES the forward saves inputs and log-sum-exps, not a [V, H] gradient."""
    h, w, t = inputs()
    h.requires_grad_()
    w.requires_grad_()
    for limit, expect_buffer in ((1 << 30, True), (0, False)):
        monkeypatch.setattr(cross_entropy, "SAVED_WEIGHT_GRAD_BYTES", limit)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x, saved=saved: saved.append(x) or x, lambda x: x):
            linear_cross_entropy(h, w, t)
        weight_sized = [s for s in saved if s.shape == w.shape and s.data_ptr() != w.data_ptr()]
        assert bool(weight_sized) == expect_buffer


def test_bf16_autocast_keeps_float32_gradients():
    h, w, t = inputs()
    h.requires_grad_()
    w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, t)
    loss.backward()
    assert loss.dtype == h.grad.dtype == w.grad.dtype == torch.float32
    want, grad_h, grad_w = reference(h, w, t, "mean")
    assert abs(loss.item() - want.item()) < 2e-2
    assert (w.grad.double() - grad_w).abs().max() < 1e-2 * grad_w.abs().max()


def test_no_gradient_needed_and_everything_ignored():
    h, w, t = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t)
        per_token = linear_cross_entropy(h, w, t, reduction="none")
    want = reference(h, w, t, "none")[0]
    torch.testing.assert_close(loss.double(), want.sum() / (t != -100).sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(per_token.double(), want, rtol=1e-6, atol=1e-7)
    h.requires_grad_()
    for token_weights in (None, torch.ones(t.shape)):
        loss = linear_cross_entropy(h, w, torch.full_like(t, -100), token_weights=token_weights)
        loss.backward()
        assert loss.item() == 0 and h.grad.abs().sum() == 0


def test_bad_arguments_are_named():
    h, w, t = inputs()
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match=r"\(50, 23\)"):
        linear_cross_entropy(h, w[:, :23], t)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t[:, :-1])
    with pytest.raises(ValueError, match="token_weights"):
        linear_cross_entropy(h, w, t, token_weights=torch.ones(3))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(h, w, t, temperature=0.0)


def test_no_gradient_work_under_no_grad_and_a_retained_graph_runs_twice(monkeypatch):
    h, w, t = inputs()
    w.requires_grad_()
    asked = []
    forward = cross_entropy._forward

    def recording(*args):
        asked.append(args[5:7])  # (want_hidden, want_weight)
        return forward(*args)

    monkeypatch.setattr(cross_entropy, "_forward", recording)
    with torch.no_grad():
        linear_cross_entropy(h, w, t)
    assert asked == [(False, False)]  # evaluation with trainable weights computes the loss only
    h.requires_grad_()
    for limit in (1 << 30, 0):  # gradients saved in the forward, or recomputed
        monkeypatch.setattr(cross_entropy, "SAVED_WEIGHT_GRAD_BYTES", limit)
        loss = linear_cross_entropy(h, w, t)
        first = torch.autograd.grad(loss, (h, w), retain_graph=True)
        second = torch.autograd.grad(2 * loss, (h, w))
        for a, b in zip(first, second):
            torch.testing.assert_close(2 * a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_entropy_match_float64(small_chunks, temperature):
    h, w, t = inputs()
    h.requires_grad_()
    w.requires_grad_()
    upstream = torch.randn(t.shape, generator=torch.Generator().manual_seed(2))
    logp, entropy = token_logprobs(h, w, t, temperature=temperature, entropy=True)
    (logp * upstream).sum().backward()

    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    log_probs = torch.log_softmax(h64 @ w64.T / temperature, dim=-1)  # [2, 35, V]
    kept = t != -100
    want = log_probs.gather(-1, t.clamp(min=0)[..., None]).squeeze(-1) * kept
    want_entropy = -(log_probs.exp() * log_probs).sum(-1) * kept
    (want * upstream.double()).sum().backward()
    torch.testing.assert_close(logp.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entropy.double(), want_entropy, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-6)
    assert not entropy.requires_grad
    with torch.no_grad():  # the evaluation path gives the same values
        torch.testing.assert_close(token_logprobs(h, w, t, temperature=temperature), logp.detach())
