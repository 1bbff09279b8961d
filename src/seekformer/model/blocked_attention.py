"""Causal attention on CPU as matrix products over blocks of queries.

Query block i (rows s..e) attends to keys 0..e: one product for its scores, a float32 softmax with
the upper triangle of the diagonal block masked, one product with the values. Blocks above the
diagonal are never computed, so with 128-row blocks a 512-token sequence computes 62% of the full
score matrix, and the values keep their own head dim (MLA's v_head_dim) instead of being padded to
the query's as the fused SDPA kernel needs.

Measured on a 2-core CPU (`benchmarks/attention.py`: 8 heads, q/k 96 and v 64 dims, 512 tokens,
batch 4, fp32 inputs and under bf16 autocast), per layer: forward + backward 54 / 41 ms against
SDPA's fused kernel's 93 / 79 ms, forward 22 / 13 ms against 28 / 24 ms. The fused kernel keeps
O(T) memory and wins in fp32 beyond about 1024 tokens, so `use_blocked_attention` sends only
shorter causal sequences here.

The backward keeps the float32 probabilities of the forward (B*H*T*(T+block)/2 numbers, at most
MAX_SAVED_BYTES per call: at 512 tokens about twice what q, k, v and the output take) and uses
the usual identities: dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K * scale,
dK = dS^T Q * scale. dK and dV sum over query blocks in float32.

Inference in bf16 (no gradient wanted) takes a leaner forward at any length: the scale is folded
into the queries, the scores stay bf16 and go through one softmax (float32 inside, bf16 out) straight
into the product with the values, 256-query blocks, one head at a time (2-D products that read the
keys and values in place; a block's scores stay within 2 MB at 4,096 tokens). Measured on one core
at 4,096 tokens (16 heads, q/k 192, v 128, MLA's transposed layout): 0.68-0.72 s against SDPA's
fused kernel's 1.34-1.55 s (which also needs the values padded to 192), 0.98 s for the float32
softmax above; at 1,024 tokens about 60 / 110-130 / 65 ms. Its error against float64 is that of
the path above (bf16 scores, bf16 probabilities), about twice the fused kernel's (tested).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .layers import compute_dtype

BLOCK = 128
MAX_TOKENS = 1024  # beyond this the fused SDPA kernel is as fast or faster (fp32) and lighter
MAX_SAVED_BYTES = 256 << 20  # float32 probabilities kept for the backward, per call
INFERENCE_BLOCK = 256  # query rows per block of the bf16 inference forward


def use_blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> bool:
    """Whether plain causal attention over q [B, H, T, D] (keys k, T == S) should take this path:
    up to MAX_TOKENS tokens, or any length in bf16 without gradients (a prefill).

    Only float32 and bfloat16 products: fp16 scores, rounded before the float32 softmax, overflow
    where SDPA's float32 scores do not.
    """
    T = q.shape[-2]
    if q.device.type != "cpu" or dropout > 0 or T != k.shape[-2] or T < 2:
        return False
    dtype = _compute_dtype(q, k, v)
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    if _needs_grad(q, k, v):
        batch_heads = q.numel() // (T * q.shape[-1])
        return T <= MAX_TOKENS and batch_heads * T * (T + BLOCK) // 2 * 4 <= MAX_SAVED_BYTES
    return T <= MAX_TOKENS or dtype == torch.bfloat16


def blocked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             block: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v for q, k [B, H, T, D] and v [B, H, T, Dv].

    Products run in the autocast dtype under CPU autocast (as SDPA's do), else in the inputs'
    common dtype; the softmax in float32. In bf16 the scores are rounded to bf16 when they leave
    their product (a CPU matmul cannot write bf16 products to float32), where SDPA's fused kernel
    keeps them in float32: with very peaked attention (logits ~50 and more) the error against
    float64 is about twice SDPA's; at ordinary logits the two are alike (tested). Without gradients
    bf16 takes `_forward_bf16` (blocks of INFERENCE_BLOCK rows unless `block` says otherwise).
    """
    dtype = _compute_dtype(q, k, v)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    with torch.autocast("cpu", enabled=False):
        if _needs_grad(q, k, v):
            return _BlockedCausalAttention.apply(q, k, v, scale, block or BLOCK)
        if dtype == torch.bfloat16:
            return _forward_bf16(q, k, v, scale, block or INFERENCE_BLOCK)
        return _forward(q, k, v, scale, block or BLOCK, keep=None)


def _compute_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    return compute_dtype(q.device.type, torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype))


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _forward(q, k, v, scale: float, block: int, keep: list | None) -> torch.Tensor:
    T = q.shape[-2]
    out = v.new_empty(*q.shape[:-1], v.shape[-1])
    for start in range(0, T, block):
        end = min(start + block, T)
        scores = torch.matmul(q[..., start:end, :], k[..., :end, :].transpose(-1, -2)).float()
        scores.mul_(scale)
        future = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).triu_(1)
        scores[..., start:end].masked_fill_(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # [B, H, rows, end] float32
        out[..., start:end, :] = torch.matmul(probs.to(v.dtype), v[..., :end, :])
        if keep is not None:
            keep.append(probs)
    return out


def _forward_bf16(q, k, v, scale: float, block: int) -> torch.Tensor:
    """The bf16 inference forward: scores and probabilities stay bf16 (the softmax computes in
    float32 inside), the scale is folded into the queries.

    A sequence of one block runs as one batched product over every head. Longer ones run one head
    and block at a time as plain 2-D products: a batched product over a slice of the keys or values
    (the first `end` rows of each head) copies that slice first, which at 4,096 tokens cost more
    than the softmax; a 2-D product reads it in place. The heads are shared out among
    `torch.get_num_threads()` pool threads that each run their products on one thread: thousands of
    small multi-threaded products each wait for every thread, which on a CPU shared with other jobs
    made this path 10x slower than SDPA's fused kernel (one parallel region per call); independent
    threads just proceed.
    """
    B, H, T, _ = q.shape
    if T <= block:
        # one copy each into [B*H, T, D] order (MLA's inputs are transposed views)
        q, k, v = ((t * scale if t is q else t).reshape(B * H, T, t.shape[-1]).contiguous() for t in (q, k, v))
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores.masked_fill_(torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), v).view(B, H, T, -1)
    # per head, 2-D views of the inputs as laid out (rows may be strided: MLA's [B, T, H, D] buffers seen
    # as [B, H, T, D]), read in place at the speed of contiguous ones (measured); the scaled queries keep
    # q's layout, and the output is written in [B, T, H, Dv] order, which the output projection reads
    q = q * scale
    out = v.new_empty(B, T, H, v.shape[-1]).transpose(1, 2)
    heads = [(b, h) for b in range(B) for h in range(H)]
    workers = min(torch.get_num_threads(), B * H)
    if workers == 1:
        _attend_heads(q, k, v, out, heads, block)
    else:
        inference = torch.is_inference_mode_enabled()
        jobs = [_pool(workers).submit(_attend_heads_in_pool, q, k, v, out, heads[w::workers], block, inference)
                for w in range(workers)]
        for job in jobs:
            job.result()
    return out


def _attend_heads(q, k, v, out, heads: list[tuple[int, int]], block: int) -> None:
    """Causal attention of the given (batch row, head) pairs of q, k, v [B, H, T, D] into out, by
    blocks of queries."""
    T = q.shape[2]
    for start in range(0, T, block):
        end = min(start + block, T)
        # -inf above the diagonal, 0 elsewhere: an add (x + 0 is x, bit for bit) ran ~5x faster than
        # `masked_fill_` with a boolean mask on these [block, block] slices
        future = torch.full((end - start, end - start), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        for b, h in heads:
            scores = torch.mm(q[b, h, start:end], k[b, h, :end].t())
            scores[:, start:].add_(future)
            torch.mm(torch.softmax(scores, dim=-1), v[b, h, :end], out=out[b, h, start:end])


def _attend_heads_in_pool(q, k, v, out, heads: list[tuple[int, int]], block: int, inference: bool) -> None:
    with torch.inference_mode(inference):  # the caller's mode: its tensors may be inference tensors
        _attend_heads(q, k, v, out, heads, block)


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of `workers` threads that run their torch operations on one thread each (the setting is
    per thread: the caller's is unchanged). Per process: a forked child has none of its parent's
    threads, and would wait forever on a pool it inherited."""
    key = (os.getpid(), workers)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="seekformer-attention",
                                         initializer=torch.set_num_threads, initargs=(1,))
    return _POOLS[key]


class _BlockedCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, block):
        probs: list[torch.Tensor] = []
        out = _forward(q, k, v, scale, block, keep=probs)
        ctx.save_for_backward(q, k, v, out, *probs)
        ctx.scale, ctx.block = scale, block
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):  # products in the forward's dtype
            return _backward(ctx, grad_out)


def _backward(ctx, grad_out):
    q, k, v, out, *probs = ctx.saved_tensors
    need_q, need_k, need_v = ctx.needs_input_grad[:3]
    scale, block = ctx.scale, ctx.block
    grad_out = grad_out.to(v.dtype)
    grad_q = torch.empty_like(q) if need_q else None
    grad_k = torch.zeros(k.shape, dtype=torch.float32, device=k.device) if need_k else None
    grad_v = torch.zeros(v.shape, dtype=torch.float32, device=v.device) if need_v else None
    delta = (grad_out.float() * out.float()).sum(dim=-1, keepdim=True)  # [B, H, T, 1]
    for start, p in zip(range(0, q.shape[-2], block), probs):
        end = start + p.shape[-2]
        d_out = grad_out[..., start:end, :]
        if need_v:
            grad_v[..., :end, :] += torch.matmul(p.to(v.dtype).transpose(-1, -2), d_out)
        if not (need_q or need_k):
            continue
        d_scores = torch.matmul(d_out, v[..., :end, :].transpose(-1, -2)).float()
        d_scores.sub_(delta[..., start:end, :]).mul_(p).mul_(scale)
        d_scores = d_scores.to(q.dtype)
        if need_q:
            grad_q[..., start:end, :] = torch.matmul(d_scores, k[..., :end, :])
        if need_k:
            grad_k[..., :end, :] += torch.matmul(d_scores.transpose(-1, -2), q[..., start:end, :])
    return (grad_q, grad_k.to(k.dtype) if need_k else None, grad_v.to(v.dtype) if need_v else None,
            None, None)
