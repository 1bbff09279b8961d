"""The FP8 GEMM of DeepSeek-V3's training recipe (report §3.3): cuBLAS block-scaled kernels on Hopper,
an exact emulation everywhere else.

``fp8_gemm(a_q, a_scale, b_q, b_scale)`` computes ``A Bᵀ`` for FP8 (e4m3) operands ``A [M, K]`` and
``B [N, K]``, each with one float32 scale per tile of ``block_rows x 128`` along K:

* activations and gradients: 1x128 tiles (``block_rows = 1``, scale shape ``[M, ceil(K/128)]``);
* weights: 128x128 blocks (``block_rows = 128``, scale shape ``[ceil(N/128), ceil(K/128)]``).

V3's tensor cores multiply the raw FP8 values of one 128-wide slice of K, and every 128 elements of
K the partial sum is promoted to a float32 register on the CUDA cores, multiplied by the two tiles'
scales and added to the float32 accumulator.

* **CUDA, compute capability 9.x (H100/H200/H800)**: ``torch.nn.functional.scaled_mm`` with the
  ``BlockWise1x128`` / ``BlockWise128x128`` recipes, cuBLASLt's kernels for exactly these scales
  (:func:`uses_block_scaled_kernel`). Operands whose K or N is not a multiple of 16 (cuBLASLt's
  alignment) are zero-padded, which changes no value.
* **Everywhere else** the emulation does what the report describes: per 128-wide chunk of K one
  matrix product of the raw e4m3 values (exact in float32: an e4m3 value has 4 significant bits, a
  product 8, accumulated in float32), scaled by ``a_scale[m, c] * b_scale[n, c]`` and summed into a
  float32 output. It equals a float64 product of the dequantised operands up to float32 summation
  rounding. On CPU it is also the faster choice: ``torch._scaled_mm`` runs there at 121 GFLOP/s
  against ~150 for the float32 products used here (DESIGN.md, 1024³, 2 threads).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .fp8 import FP8_DTYPE

TILE = 128  # the K interval of the promotion to float32, and the width of every scale tile
ALIGN = 16  # cuBLASLt's FP8 operands need K and N divisible by 16


def _row_scales(scale: torch.Tensor, block_rows: int, rows: int) -> torch.Tensor:
    """Per-row scales [rows, n_chunks] from per-tile scales [ceil(rows/block_rows), n_chunks]."""
    if block_rows == 1:
        return scale.float()
    return scale.float().repeat_interleave(block_rows, dim=0)[:rows]


def _check(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
           a_block_rows: int, b_block_rows: int) -> None:
    if a_q.dtype != FP8_DTYPE or b_q.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_gemm: operands must be {FP8_DTYPE}, got {a_q.dtype} and {b_q.dtype}")
    if a_q.dim() != 2 or b_q.dim() != 2 or a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"fp8_gemm: need A [M, K] and B [N, K], got {tuple(a_q.shape)} and {tuple(b_q.shape)}")
    (m, k), n = a_q.shape, b_q.shape[0]
    chunks = math.ceil(k / TILE)
    if a_scale.shape[1] != chunks or b_scale.shape[1] != chunks:
        raise ValueError(f"fp8_gemm: scales must have ceil({k}/{TILE}) = {chunks} columns, got "
                         f"{tuple(a_scale.shape)} and {tuple(b_scale.shape)}")
    for name, scale, block_rows, rows in (("A", a_scale, a_block_rows, m), ("B", b_scale, b_block_rows, n)):
        if block_rows not in (1, TILE):
            raise ValueError(f"fp8_gemm: {name} tiles must be 1 or {TILE} rows, got {block_rows}")
        if scale.shape[0] != math.ceil(rows / block_rows):
            raise ValueError(f"fp8_gemm: {name} scale has {scale.shape[0]} rows of tiles, expected "
                             f"ceil({rows}/{block_rows}) = {math.ceil(rows / block_rows)}")


def uses_block_scaled_kernel(device: torch.device | str, a_block_rows: int = 1) -> bool:
    """True where :func:`fp8_gemm` runs cuBLASLt's block-scaled FP8 kernel rather than the emulation:
    a CUDA device of compute capability 9.x (the kernels exist for Hopper only), a torch with
    ``F.scaled_mm``, and A in 1x128 tiles (cuBLASLt pairs them with B in 128x128 blocks or 1x128
    tiles, the two B tilings ``fp8_gemm`` accepts)."""
    device = torch.device(device)
    return (device.type == "cuda" and hasattr(F, "scaled_mm") and a_block_rows == 1
            and torch.cuda.get_device_capability(device)[0] == 9)


def _pad_bytes(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad an e4m3 matrix to [rows, cols] (a zero byte is +0.0 in e4m3)."""
    if x.shape == (rows, cols):
        return x.contiguous()
    return F.pad(x.view(torch.uint8), (0, cols - x.shape[1], 0, rows - x.shape[0])).view(FP8_DTYPE)


def _outer_major(scale: torch.Tensor) -> torch.Tensor:
    """The same [rows, chunks] values stored column by column, as cuBLASLt reads 1x128 scales (no copy
    when they are already: the fused quantisation, ``fp8_triton``, writes them so)."""
    return scale.float().t().contiguous().t()


def _pad_scales(scale: torch.Tensor, cols: int, rows: int) -> torch.Tensor:
    """Scales padded with ones by ``cols`` columns and ``rows`` rows (no copy when both are 0)."""
    return F.pad(scale.float(), (0, cols, 0, rows), value=1.0) if cols or rows else scale.float()


def _block_scaled_kernel(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                         b_block_rows: int, out_dtype: torch.dtype) -> torch.Tensor:
    (m, k), n = a_q.shape, b_q.shape[0]
    k_pad, n_pad = -(-k // ALIGN) * ALIGN, -(-n // ALIGN) * ALIGN  # stays inside the last 128-tile
    m_pad = -(-m // 4) * 4  # a's 1x128 scales are read in columns of m floats: keep them 16-byte aligned
    a = _pad_bytes(a_q, m_pad, k_pad)
    b = _pad_bytes(b_q, n_pad, k_pad)
    sa = _outer_major(_pad_scales(a_scale, 0, m_pad - m))
    if b_block_rows == TILE:  # [ceil(K/128) padded to 4, ceil(N/128)], K-blocks contiguous per N-block
        sb = _pad_scales(b_scale, -a_scale.shape[1] % 4, 0).contiguous().t()
        recipe_b = F.ScalingType.BlockWise128x128
    else:
        sb = _outer_major(_pad_scales(b_scale, 0, n_pad - n))
        recipe_b = F.ScalingType.BlockWise1x128
    out = F.scaled_mm(a, b.t(), sa, F.ScalingType.BlockWise1x128, sb, recipe_b, output_dtype=out_dtype)
    return out if out.shape == (m, n) else out[:m, :n].contiguous()


def _emulated(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
              a_block_rows: int, b_block_rows: int) -> torch.Tensor:
    (m, k), n = a_q.shape, b_q.shape[0]
    sa = _row_scales(a_scale, a_block_rows, m)  # [M, chunks]
    sb = _row_scales(b_scale, b_block_rows, n)  # [N, chunks]
    a, b = a_q.float(), b_q.float()  # exact: every e4m3 value is a float32
    out = torch.zeros(m, n, dtype=torch.float32, device=a_q.device)
    partial = torch.empty_like(out)
    for c in range(math.ceil(k / TILE)):
        cols = slice(c * TILE, min((c + 1) * TILE, k))
        torch.mm(a[:, cols], b[:, cols].t(), out=partial)  # raw FP8 products, float32 accumulation
        partial.mul_(sa[:, c : c + 1]).mul_(sb[:, c])
        out.add_(partial)  # promoted: scaled and added to the float32 accumulator
    return out


def fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
             a_block_rows: int = 1, b_block_rows: int = TILE, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``A Bᵀ`` for e4m3 ``a_q [M, K]`` and ``b_q [N, K]`` with per-tile float32 scales, accumulated in
    float32 and returned as ``out_dtype`` (rounded once from the float32 sums).

    ``a_scale`` is ``[ceil(M / a_block_rows), ceil(K / 128)]``, ``b_scale`` likewise for ``b_q``; tiles
    are 1 or 128 rows high. The product of each 128-wide chunk of K is formed from the raw FP8 values,
    then scaled and added to the float32 result (the promotion interval of the V3 report): by cuBLASLt
    on Hopper, emulated elsewhere (module docstring).
    """
    _check(a_q, a_scale, b_q, b_scale, a_block_rows, b_block_rows)
    if uses_block_scaled_kernel(a_q.device, a_block_rows):
        return _block_scaled_kernel(a_q, a_scale, b_q, b_scale, b_block_rows, out_dtype)
    return _emulated(a_q, a_scale, b_q, b_scale, a_block_rows, b_block_rows).to(out_dtype)
