"""Chunked output-head cross-entropy against float64 logits and F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from seekformer.training import cross_entropy
from seekformer.training.cross_entropy import linear_cross_entropy


def inputs(n=70, hidden=24, vocab=50, ignored=(3, 17, 69)):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, n // 2, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * 0.3
    t = torch.randint(0, vocab, (2, n // 2), generator=gen)
    t.view(-1)[list(ignored)] = -100
    return h, w, t


def reference(h, w, t, reduction):
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss = F.cross_entropy((h64 @ w64.T).flatten(0, 1), t.flatten(), reduction=reduction)
    loss.backward()
    return loss, h64.grad, w64.grad


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_float64_over_several_chunks(monkeypatch, reduction):
    monkeypatch.setattr(cross_entropy, "MIN_CHUNK_ROWS", 16)  # 16-row chunks: 5 chunks, the last ragged
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", 16 * 50)
    h, w, t = inputs()
    h.requires_grad_()
    w.requires_grad_()
    loss = linear_cross_entropy(h, w, t, reduction=reduction)
    (3 * loss).backward()  # the upstream gradient scales both
    want, grad_h, grad_w = reference(h, w, t, reduction)
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(h.grad.double(), 3 * grad_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), 3 * grad_w, rtol=1e-5, atol=1e-6)
    assert h.grad.view(-1, 24)[17].abs().sum() == 0  # an ignored row gets no gradient


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
    torch.testing.assert_close(loss.double(), reference(h, w, t, "mean")[0], rtol=1e-6, atol=0)
    h.requires_grad_()
    loss = linear_cross_entropy(h, w, torch.full_like(t, -100))
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().sum() == 0


def test_bad_arguments_are_named():
    h, w, t = inputs()
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(ValueError, match=r"\(50, 23\)"):
        linear_cross_entropy(h, w[:, :23], t)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t[:, :-1])


def test_no_gradient_work_under_no_grad_and_a_retained_graph_runs_twice(monkeypatch):
    h, w, t = inputs()
    w.requires_grad_()
    asked = []
    chunked = cross_entropy._chunked

    def recording(*args):
        asked.append(args[-2:])  # (want_hidden, want_weight)
        return chunked(*args)

    monkeypatch.setattr(cross_entropy, "_chunked", recording)
    with torch.no_grad():
        linear_cross_entropy(h, w, t)
    assert asked == [(False, False)]  # evaluation with trainable weights computes the loss only
    h.requires_grad_()
    loss = linear_cross_entropy(h, w, t)
    first = torch.autograd.grad(loss, (h, w), retain_graph=True)
    second = torch.autograd.grad(2 * loss, (h, w))
    for a, b in zip(first, second):
        torch.testing.assert_close(2 * a, b, rtol=0, atol=0)
