"""The FP8 GEMM of DeepSeek-V3's training recipe (report §3.3), emulated exactly on any device.

``fp8_gemm(a_q, a_scale, b_q, b_scale)`` computes ``A Bᵀ`` for FP8 (e4m3) operands ``A [M, K]`` and
``B [N, K]``, each with one float32 scale per tile of ``block_rows x 128`` along K:

* activations and gradients: 1x128 tiles (``block_rows = 1``, scale shape ``[M, ceil(K/128)]``);
* weights: 128x128 blocks (``block_rows = 128``, scale shape ``[ceil(N/128), ceil(K/128)]``).

V3's tensor cores multiply the raw FP8 values of one 128-wide slice of K, and every 128 elements of
K the partial sum is promoted to a float32 register on the CUDA cores, multiplied by the two tiles'
scales and added to the float32 accumulator. The emulation does exactly that: per 128-wide chunk of K
one matrix product of the raw e4m3 values (exact in float32: an e4m3 value has 4 significant bits, a
product 8, and the product is accumulated in float32), scaled by ``a_scale[m, c] * b_scale[n, c]`` and
summed into a float32 output. It therefore equals a float64 product of the dequantised operands up to
float32 summation rounding.

Why not ``torch._scaled_mm`` on CPU: it runs there but at 121 GFLOP/s against ~150 for the float32
products used here (DESIGN.md, 1024³, 2 threads). A CUDA path through block-scaled ``_scaled_mm``
kernels is not included: no GPU was available to run it, so on CUDA the same emulation runs.
"""

from __future__ import annotations

import math

import torch

from .fp8 import FP8_DTYPE

TILE = 128  # the K interval of the promotion to float32, and the width of every scale tile


def _row_scales(scale: torch.Tensor, block_rows: int, rows: int, name: str) -> torch.Tensor:
    """Per-row scales [rows, n_chunks] from per-tile scales [ceil(rows/block_rows), n_chunks]."""
    if scale.shape[0] != math.ceil(rows / block_rows):
        raise ValueError(f"fp8_gemm: {name} scale has {scale.shape[0]} rows of tiles, expected "
                         f"ceil({rows}/{block_rows}) = {math.ceil(rows / block_rows)}")
    if block_rows == 1:
        return scale.float()
    return scale.float().repeat_interleave(block_rows, dim=0)[:rows]


def fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
             a_block_rows: int = 1, b_block_rows: int = TILE) -> torch.Tensor:
    """``A Bᵀ`` in float32 for e4m3 ``a_q [M, K]`` and ``b_q [N, K]`` with per-tile float32 scales.

    ``a_scale`` is ``[ceil(M / a_block_rows), ceil(K / 128)]``, ``b_scale`` likewise for ``b_q``. The
    product of each 128-wide chunk of K is formed from the raw FP8 values, then scaled and added to
    the float32 result (the promotion interval of the V3 report).
    """
    if a_q.dtype != FP8_DTYPE or b_q.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_gemm: operands must be {FP8_DTYPE}, got {a_q.dtype} and {b_q.dtype}")
    if a_q.dim() != 2 or b_q.dim() != 2 or a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"fp8_gemm: need A [M, K] and B [N, K], got {tuple(a_q.shape)} and {tuple(b_q.shape)}")
    (m, k), n = a_q.shape, b_q.shape[0]
    chunks = math.ceil(k / TILE)
    if a_scale.shape[1] != chunks or b_scale.shape[1] != chunks:
        raise ValueError(f"fp8_gemm: scales must have ceil({k}/{TILE}) = {chunks} columns, got "
                         f"{tuple(a_scale.shape)} and {tuple(b_scale.shape)}")
    sa = _row_scales(a_scale, a_block_rows, m, "A")  # [M, chunks]
    sb = _row_scales(b_scale, b_block_rows, n, "B")  # [N, chunks]
    a, b = a_q.float(), b_q.float()  # exact: every e4m3 value is a float32
    out = torch.zeros(m, n, dtype=torch.float32, device=a_q.device)
    partial = torch.empty_like(out)
    for c in range(chunks):
        cols = slice(c * TILE, min((c + 1) * TILE, k))
        torch.mm(a[:, cols], b[:, cols].t(), out=partial)  # raw FP8 products, float32 accumulation
        partial.mul_(sa[:, c : c + 1]).mul_(sb[:, c])
        out.add_(partial)  # promoted: scaled and added to the float32 accumulator
    return out
