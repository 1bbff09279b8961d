"""Cross-entropy of the output head without materialising the [tokens, vocab] logits.

`linear_cross_entropy(hidden, weight, targets)` equals
`F.cross_entropy(F.linear(hidden, weight).float(), targets)` (except that it is 0, not NaN, when
every target is ignored) but runs over chunks of rows: each chunk's logits are made, turned into its
loss and (when a gradient is needed) straight into its gradients with respect to `hidden` and
`weight`, and dropped. The float32 logits never exist for more than one chunk (DeepSeek-V3's
129,280-word vocabulary makes 0.5 MB per token), and on CPU the small chunk stays in cache where
full-size logits and their gradient cost page faults.

Because the loss is a scalar, its gradients are computed in the forward and only scaled by the
incoming gradient in the backward, so nothing is recomputed. What is kept from the forward to the
backward is therefore the gradients: one like `hidden` and a float32 one like `weight` per call.
That is less than the logits when the tokens per call exceed the hidden size, more below it (each
MTP depth is a call of its own). Under `torch.no_grad()` only the loss is computed.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 22  # float32 logits per chunk (16 MB) ...
MIN_CHUNK_ROWS = 128  # ... but not fewer rows: each chunk reads the whole output head once


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Mean (or sum) over targets != ignore_index of -log softmax(hidden @ weight^T)[target].

    hidden [..., H], weight [V, H], targets [...] (same leading shape). The products run in the
    autocast dtype under autocast (as `F.linear` would), else in the inputs' common dtype; the
    softmax and the loss in float32.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"expected hidden [..., H], weight [V, H] and targets [...] with hidden's leading shape; "
                         f"got {tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(targets.shape)}")
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    chunk = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // weight.shape[0])
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden, weight, targets, dtype, ignore_index, reduction == "mean", chunk)
        return _chunked(hidden, weight, targets, dtype, ignore_index, reduction == "mean", chunk, False, False)[0]


def _chunked(hidden, weight, targets, dtype, ignore_index: int, mean: bool, chunk: int,
             want_hidden: bool, want_weight: bool):
    """(loss, d loss / d hidden in the compute dtype or None, d loss / d weight in float32 or None)."""
    x, w = hidden.to(dtype), weight.to(dtype)
    valid = targets != ignore_index
    safe_targets = targets.masked_fill(~valid, 0)
    # each row's share of the reduction: d loss / d logits = (softmax - one_hot(target)) * row_scale
    row_scale = valid.float()
    if mean:
        row_scale /= valid.sum().clamp(min=1)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = x.new_empty(x.shape) if want_hidden else None
    grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_weight else None
    for start in range(0, x.shape[0], chunk):
        end = min(start + chunk, x.shape[0])
        rows, scale = x[start:end], row_scale[start:end, None]
        logits = torch.matmul(rows, w.t()).float()  # [n, V]
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        picked = logits.gather(1, safe_targets[start:end, None])
        total += ((lse - picked) * scale).sum()
        if want_hidden or want_weight:
            grad_logits = logits.sub_(lse).exp_()
            grad_logits.scatter_add_(1, safe_targets[start:end, None], torch.full_like(picked, -1.0))
            grad_logits = grad_logits.mul_(scale).to(dtype)
            if want_hidden:
                torch.matmul(grad_logits, w, out=grad_hidden[start:end])
            if want_weight:
                grad_weight += torch.matmul(grad_logits.t(), rows)  # [V, H], summed in float32
    return total, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype, ignore_index, mean, chunk):
        total, grad_hidden, grad_weight = _chunked(hidden, weight, targets, dtype, ignore_index, mean, chunk,
                                                   *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_hidden is not None:  # out of place: the saved gradients serve every backward
            grad_hidden = (grad_hidden.float() * grad_loss).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None
