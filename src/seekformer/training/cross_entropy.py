"""Cross-entropy and per-token log-probabilities of the output head without the [tokens, vocab] logits.

`linear_cross_entropy(hidden, weight, targets)` equals
`F.cross_entropy(F.linear(hidden, weight).float(), targets)` (except that it is 0, not NaN, when
every target is ignored) but runs over chunks of rows: each chunk's logits are made, turned into its
losses (and gradients) and dropped. The float32 logits never exist for more than one chunk
(DeepSeek-V3's 129,280-word vocabulary makes 0.5 MB per token), and on CPU the small chunk stays in
cache where full-size logits and their gradient cost page faults. `reduction="none"` gives the
per-token losses, `token_weights` weights them; `token_logprobs` gives log p(target) on
temperature-scaled logits (and the entropy) for reinforcement learning.

Gradients take one of two paths:
- **in the forward** (a scalar loss, and a weight gradient of at most `SAVED_WEIGHT_GRAD_BYTES`):
  each chunk's gradients with respect to `hidden` and `weight` are made while its logits exist, and
  the backward only scales them by the incoming gradient. Nothing is recomputed, but a float32
  gradient like `weight` is kept from the forward to the backward (8 MB for the tiny presets).
- **recomputed in the backward** (per-token losses, or a weight gradient above that size: 3.7 GB
  for DeepSeek-V3's head): the forward keeps only each row's log-sum-exp; the backward makes each
  chunk's logits again. One more output-head matrix product, and no [vocab, hidden] buffer beyond
  the gradient autograd itself returns.
Under `torch.no_grad()` only the losses are computed.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 22  # float32 logits per chunk (16 MB) ...
MIN_CHUNK_ROWS = 128  # ... but not fewer rows: each chunk reads the whole output head once
SAVED_WEIGHT_GRAD_BYTES = 1 << 28  # above this, the weight gradient is recomputed in the backward
REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, reduction: str = "mean",
                         token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """-log softmax(hidden @ weight^T)[target] per token, reduced over targets != ignore_index.

    hidden [..., H], weight [V, H], targets [...] (same leading shape). `reduction`: "mean" (the
    mean over kept targets), "sum", or "none" (per-token losses [...], 0 at ignored targets). With
    `token_weights` [...] each token's loss is multiplied by its weight: "sum" is sum(w * loss),
    "mean" the weighted mean sum(w * loss) / sum(w) over kept targets (as `F.cross_entropy` does with
    class weights), "none" w * loss. The weights are constants (they get no gradient).

    The products run in the autocast dtype under autocast (as `F.linear` would), else in the inputs'
    common dtype; the softmax and the loss in float32.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    _check_shapes(hidden, weight, targets)
    valid = targets != ignore_index
    coef = valid.float()
    if token_weights is not None:
        if token_weights.shape != targets.shape:
            raise ValueError(f"token_weights must have the targets' shape {tuple(targets.shape)}, "
                             f"got {tuple(token_weights.shape)}")
        coef = coef * token_weights.detach().float()
    if reduction == "mean":
        total = coef.sum() if token_weights is not None else valid.sum()
        coef = coef / torch.where(total != 0, total, 1.0)
    losses = _apply(hidden, weight, targets, valid, coef, 1.0, reduce=reduction != "none")
    return losses if reduction != "none" else losses.view(targets.shape)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   ignore_index: int = -100, entropy: bool = False
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(hidden @ weight^T / temperature)[target] for every token: [...] float32, 0 where
    the target is `ignore_index`; differentiable with respect to `hidden` and `weight`.

    With `entropy=True` also the entropy of each token's temperature-scaled distribution ([...],
    float32, no gradient; 0 where ignored), from the same pass over the logits. Sampling at
    temperature T draws from exactly this distribution, so rollout and update log-probs agree.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    _check_shapes(hidden, weight, targets)
    valid = targets != ignore_index
    scale = 1.0 / float(temperature)
    result = _apply(hidden, weight, targets, valid, valid.float(), scale, reduce=False, want_entropy=entropy)
    if entropy:
        losses, ent = result
        return -losses.view(targets.shape), ent.view(targets.shape)
    return -result.view(targets.shape)


def _check_shapes(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"expected hidden [..., H], weight [V, H] and targets [...] with hidden's leading shape; "
                         f"got {tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(targets.shape)}")


def _apply(hidden, weight, targets, valid, coef, scale: float, reduce: bool, want_entropy: bool = False):
    """sum_i coef_i * loss_i (reduce) or coef_i * loss_i per row [N] (and the entropy per row)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    chunk = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // weight.shape[0])
    spec = _Spec(dtype, scale, chunk, reduce)
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    valid, coef = valid.reshape(-1), coef.reshape(-1)
    safe_targets = targets.masked_fill(~valid, 0)
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            out = _LinearCrossEntropy.apply(hidden, weight, safe_targets, coef, spec, want_entropy)
            return out if want_entropy else out[0]
        losses, _, _, _, ent = _forward(hidden, weight, safe_targets, coef, spec, False, False, want_entropy)
        out = (losses * coef).sum() if reduce else losses * coef
        return (out, ent * valid) if want_entropy else out


class _Spec:
    """The settings of one call: compute dtype, logit scale (1 / temperature), rows per chunk, and
    whether the output is the scalar sum of the rows' weighted losses."""

    def __init__(self, dtype: torch.dtype, scale: float, chunk: int, reduce: bool):
        self.dtype, self.scale, self.chunk, self.reduce = dtype, scale, chunk, reduce


def _chunk_logits(rows: torch.Tensor, w: torch.Tensor, scale: float) -> torch.Tensor:
    logits = torch.matmul(rows, w.t()).float()  # [n, V]
    return logits.mul_(scale) if scale != 1.0 else logits


def _grad_logits(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, coef: torch.Tensor,
                 spec: _Spec) -> torch.Tensor:
    """d (coef * loss) / d (hidden @ weight^T) = coef * scale * (softmax - one_hot(target)), in place."""
    grad = logits.sub_(lse[:, None]).exp_()
    grad.scatter_add_(1, targets[:, None], torch.full_like(lse[:, None], -1.0))
    return grad.mul_((coef * spec.scale)[:, None]).to(spec.dtype)


def _forward(hidden, weight, targets, coef, spec: _Spec, want_hidden: bool, want_weight: bool,
             want_entropy: bool = False):
    """(unweighted loss per row [N] float32, log-sum-exp per row, d out / d hidden or None,
    d out / d weight in float32 or None, entropy per row or None), chunk by chunk; the gradients
    are those of sum_i coef_i * loss_i."""
    x, w = hidden.to(spec.dtype), weight.to(spec.dtype)
    n = x.shape[0]
    losses = torch.empty(n, dtype=torch.float32, device=x.device)
    lse_all = torch.empty(n, dtype=torch.float32, device=x.device)
    ent = torch.empty(n, dtype=torch.float32, device=x.device) if want_entropy else None
    grad_hidden = x.new_empty(x.shape) if want_hidden else None
    grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_weight else None
    for start in range(0, n, spec.chunk):
        end = min(start + spec.chunk, n)
        rows = x[start:end]
        logits = _chunk_logits(rows, w, spec.scale)
        lse = torch.logsumexp(logits, dim=-1)
        lse_all[start:end] = lse
        losses[start:end] = lse - logits.gather(1, targets[start:end, None]).squeeze(1)
        if want_entropy:  # H = lse - sum_v p_v z_v
            ent[start:end] = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        if want_hidden or want_weight:
            grad = _grad_logits(logits, lse, targets[start:end], coef[start:end], spec)
            if want_hidden:
                torch.matmul(grad, w, out=grad_hidden[start:end])
            if want_weight:
                grad_weight += torch.matmul(grad.t(), rows)  # [V, H], summed in float32
    return losses, lse_all, grad_hidden, grad_weight, ent


def _recomputed_grads(hidden, weight, targets, lse_all, coef, spec: _Spec, want_hidden: bool, want_weight: bool):
    """The gradients of sum_i coef_i * loss_i, making each chunk's logits again from the saved
    log-sum-exp."""
    x, w = hidden.to(spec.dtype), weight.to(spec.dtype)
    grad_hidden = x.new_empty(x.shape) if want_hidden else None
    grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_weight else None
    for start in range(0, x.shape[0], spec.chunk):
        end = min(start + spec.chunk, x.shape[0])
        rows = x[start:end]
        grad = _grad_logits(_chunk_logits(rows, w, spec.scale), lse_all[start:end], targets[start:end],
                            coef[start:end], spec)
        if want_hidden:
            torch.matmul(grad, w, out=grad_hidden[start:end])
        if want_weight:
            grad_weight += torch.matmul(grad.t(), rows)
    return grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    """Outputs (sum_i coef_i loss_i or coef_i loss_i per row, entropy per row or an empty tensor)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, coef, spec: _Spec, want_entropy: bool):
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        weight_grad_bytes = weight.numel() * 4 if want_weight else 0
        eager = spec.reduce and weight_grad_bytes <= SAVED_WEIGHT_GRAD_BYTES
        ctx.spec, ctx.eager, ctx.dtypes = spec, eager, (hidden.dtype, weight.dtype)
        losses, lse, grad_hidden, grad_weight, ent = _forward(
            hidden, weight, targets, coef, spec, want_hidden and eager, want_weight and eager, want_entropy)
        if eager:
            ctx.save_for_backward(grad_hidden, grad_weight)
        else:
            ctx.save_for_backward(hidden, weight, targets, lse, coef)
        out = (losses * coef).sum() if spec.reduce else losses * coef
        ent = ent * (coef != 0) if want_entropy else losses.new_empty(0)
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_entropy):
        hidden_dtype, weight_dtype = ctx.dtypes
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        if ctx.eager:  # out of place: the saved gradients serve every backward of a retained graph
            grad_hidden, grad_weight = ctx.saved_tensors
            if grad_hidden is not None:
                grad_hidden = (grad_hidden.float() * grad_out).to(hidden_dtype)
            if grad_weight is not None:
                grad_weight = (grad_weight * grad_out).to(weight_dtype)
        else:
            hidden, weight, targets, lse, coef = ctx.saved_tensors
            grad_hidden, grad_weight = _recomputed_grads(hidden, weight, targets, lse, coef * grad_out.float(),
                                                         ctx.spec, want_hidden, want_weight)
            grad_hidden = grad_hidden.to(hidden_dtype) if grad_hidden is not None else None
            grad_weight = grad_weight.to(weight_dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None


def linear_kl_divergence(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                         teacher_weight: torch.Tensor, mask: torch.Tensor | None = None, temperature: float = 1.0,
                         reduction: str = "mean") -> torch.Tensor:
    """Forward KL from the teacher's next-token distribution to the student's, without full logits:
    KL(softmax(teacher_hidden @ teacher_weight^T / T) || softmax(hidden @ weight^T / T)) per
    position, averaged ("mean") or summed ("sum") over the positions where `mask` [...] is True.

    hidden [..., H] and weight [V, H] are the student's (the gradient flows to them), teacher_hidden
    [..., H_t] and teacher_weight [V, H_t] the teacher's (no gradient). The two must share the
    vocabulary. Chunked as `linear_cross_entropy`, with the same two gradient paths.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"teacher and student vocabularies differ: the teacher's output head has "
                         f"{teacher_weight.shape[0]} rows, the student's {weight.shape[0]}; logit distillation "
                         "needs one shared tokenizer")
    if hidden.shape[:-1] != teacher_hidden.shape[:-1] or hidden.shape[-1] != weight.shape[-1] \
            or teacher_hidden.shape[-1] != teacher_weight.shape[-1]:
        raise ValueError(f"expected hidden [..., H] with weight [V, H] and teacher_hidden [..., H_t] with "
                         f"teacher_weight [V, H_t] over the same positions; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(teacher_hidden.shape)} and {tuple(teacher_weight.shape)}")
    keep = torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device) if mask is None else mask.bool()
    coef = keep.reshape(-1).float()
    if reduction == "mean":
        coef = coef / coef.sum().clamp(min=1)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else \
        torch.promote_types(hidden.dtype, weight.dtype)
    spec = _Spec(dtype, 1.0 / float(temperature), max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // weight.shape[0]), True)
    hidden, teacher_hidden = hidden.reshape(-1, hidden.shape[-1]), teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearKL.apply(hidden, weight, teacher_hidden, teacher_weight, coef, spec)
        return _kl_chunks(hidden, weight, teacher_hidden, teacher_weight, coef, spec, False, False)[0]


def _kl_chunks(hidden, weight, teacher_hidden, teacher_weight, coef, spec: _Spec, want_hidden: bool,
               want_weight: bool):
    """(sum_i coef_i KL_i, its gradient with respect to hidden or None, to weight in float32 or None)."""
    x, w = hidden.to(spec.dtype), weight.to(spec.dtype)
    tx, tw = teacher_hidden.to(spec.dtype), teacher_weight.to(spec.dtype)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    grad_hidden = x.new_empty(x.shape) if want_hidden else None
    grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_weight else None
    for start in range(0, x.shape[0], spec.chunk):
        end = min(start + spec.chunk, x.shape[0])
        rows, c = x[start:end], coef[start:end]
        log_student = torch.log_softmax(_chunk_logits(rows, w, spec.scale), dim=-1)  # [n, V]
        log_teacher = torch.log_softmax(_chunk_logits(tx[start:end], tw, spec.scale), dim=-1)
        teacher = log_teacher.exp()
        total += ((teacher * (log_teacher - log_student)).sum(-1) * c).sum()
        if want_hidden or want_weight:  # d KL / d student logits = (p_student - p_teacher) / T
            grad = log_student.exp_().sub_(teacher).mul_((c * spec.scale)[:, None]).to(spec.dtype)
            if want_hidden:
                torch.matmul(grad, w, out=grad_hidden[start:end])
            if want_weight:
                grad_weight += torch.matmul(grad.t(), rows)
    return total, grad_hidden, grad_weight


class _LinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, coef, spec: _Spec):
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        ctx.eager = (weight.numel() * 4 if want_weight else 0) <= SAVED_WEIGHT_GRAD_BYTES
        ctx.spec, ctx.dtypes = spec, (hidden.dtype, weight.dtype)
        total, grad_hidden, grad_weight = _kl_chunks(hidden, weight, teacher_hidden, teacher_weight, coef, spec,
                                                     want_hidden and ctx.eager, want_weight and ctx.eager)
        if ctx.eager:
            ctx.save_for_backward(grad_hidden, grad_weight)
        else:
            ctx.save_for_backward(hidden, weight, teacher_hidden, teacher_weight, coef)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden_dtype, weight_dtype = ctx.dtypes
        if ctx.eager:
            grad_hidden, grad_weight = ctx.saved_tensors
            grad_hidden = grad_hidden.float() * grad_out if grad_hidden is not None else None
            grad_weight = grad_weight * grad_out if grad_weight is not None else None
        else:
            hidden, weight, teacher_hidden, teacher_weight, coef = ctx.saved_tensors
            _, grad_hidden, grad_weight = _kl_chunks(hidden, weight, teacher_hidden, teacher_weight,
                                                     coef * grad_out.float(), ctx.spec, *ctx.needs_input_grad[:2])
        grad_hidden = grad_hidden.to(hidden_dtype) if grad_hidden is not None else None
        grad_weight = grad_weight.to(weight_dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None
