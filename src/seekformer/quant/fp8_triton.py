"""Fused FP8 quantisation for the training GEMMs on CUDA (Triton): one read of the tensor, one write.

:func:`~seekformer.quant.fp8.quantize_blockwise` quantises in several torch passes (block maxima,
minima, division, cast). Here one kernel launch reads each element once and writes its e4m3 byte and
the tile scales, with exactly ``quantize_blockwise``'s arithmetic, so the output is bit for bit the
same: ``amax`` of ``|x|`` per tile (NaN propagating, as ``torch.amax``), ``scale = amax / 448``
rounded to nearest, scale 1 where that is not positive (zero and underflowing tiles), ``x / scale``
rounded to nearest, clamped to ±448 and rounded to nearest even e4m3. Both divisions are IEEE
``div.rn.f32`` on CUDA (``_div_rn``): Triton's ``/`` is approximate there and its ``div_rn`` flushes
subnormals to zero.

* :func:`quantize_tiles` — 1x128 tiles along the last dimension (activations, gradients) or 128x128
  blocks (weights) of a 2-D tensor of any strides. A transposed view (``g.t()`` for the weight
  gradient, ``weight.t()`` for the input gradient) is read in place: the result is written in the
  transposed, contiguous layout the GEMM takes, with no transpose copy.
* :func:`requantize_transposed` — the weight gradient's ``Xᵀ`` operand straight from the forward's
  FP8 copy of X: ``quantize_blockwise(dequantize_blockwise(x_q, x_s, (1, 128)).t(), (1, 128))`` in one
  pass.

1x128 scales are written column by column (``[rows, tiles]`` with strides ``(1, rows)``), the layout
cuBLASLt reads them in (:mod:`~seekformer.quant.fp8_gemm`), so the GEMM does not copy them. This
module imports triton; :mod:`~seekformer.quant.fp8_training` imports it only for CUDA tensors.

Under Triton's CPU interpreter (``TRITON_INTERPRET=1``, CPU tensors; how the tests run the kernels
without a GPU) the float32 -> e4m3 cast is done with integer operations (``_e4m3_bits``), because
the interpreter's own cast does not round correctly (it drops the carry of a rounded-up mantissa:
124.3 becomes 64), and bf16 is read as its bits (the interpreter widens bf16 subnormals wrongly); on
CUDA the hardware conversions (``cvt.rn.satfinite`` to e4m3) are used.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .fp8 import FP8_DTYPE, FP8_MAX

TILE = 128
_E4M3_MAX = tl.constexpr(FP8_MAX)
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _div_rn(a, b, INTERPRETED: tl.constexpr):
    """``a / b`` rounded to nearest, subnormals kept: IEEE division, as torch divides. (``tl.div_rn``
    is ``div.rn.ftz.f32`` on CUDA: it flushes subnormal operands and results to zero.)"""
    if INTERPRETED:  # numpy's division
        return tl.div_rn(a, b)
    else:
        return tl.inline_asm_elementwise("div.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _e4m3_bits(y):
    """e4m3fn bits of float32 ``y`` (|y| <= 448 or NaN), rounded to nearest even, by integer operations."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    # normal e4m3 (|y| >= 2^-6, float32 biased exponent >= 121): keep 3 mantissa bits, nearest even
    normal = ((mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20) - (120 << 3)
    # subnormal e4m3: multiples of 2^-9; |y| = m * 2^(e - 150), so the count of 2^-9 is m >> (141 - e)
    exponent = mag >> 23
    m = (mag & 0x7FFFFF) | 0x800000
    shift = tl.minimum(141 - exponent, 31)
    shift = tl.maximum(shift, 1)  # only normal values have shift < 21; keeps the shifts defined for them
    sub = (m + (1 << (shift - 1)) - 1 + ((m >> shift) & 1)) >> shift
    out = tl.where(exponent >= 121, normal, sub)
    out = tl.where(mag > 0x7F800000, 0x7F, out)  # NaN
    return out | sign


@triton.jit
def _quantize_tiles_kernel(
    x_ptr, in_scale_ptr, q_ptr, scale_ptr,
    rows, cols, x_stride_r, x_stride_c, in_scale_stride_r, in_scale_stride_c, scale_stride_r, scale_stride_c,
    BLOCK_ROWS: tl.constexpr, TILE_COLS: tl.constexpr, WHOLE_BLOCK: tl.constexpr, FP8_INPUT: tl.constexpr,
    INTERPRETED: tl.constexpr, BF16_BITS: tl.constexpr,
):
    """One program: ``BLOCK_ROWS`` rows x one 128-wide tile of columns of the logical ``[rows, cols]``
    view of ``x``. ``WHOLE_BLOCK``: one scale for the program's block (128x128 weights), else one per
    row (1x128 tiles). ``FP8_INPUT``: ``x`` is e4m3 with one scale per 128 logical rows and column
    (a transposed 1x128-tiled tensor), dequantised in float32 first. ``INTERPRETED``: the CPU
    interpreter's workarounds (module docstring)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = pid_r.to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c = pid_c.to(tl.int64) * TILE_COLS + tl.arange(0, TILE_COLS)
    row_ok = r < rows
    mask = row_ok[:, None] & (c < cols)[None, :]
    x = tl.load(x_ptr + r[:, None] * x_stride_r + c[None, :] * x_stride_c, mask=mask, other=0.0)
    if BF16_BITS:  # bf16 passed as its int16 bits: the float32 with the same upper half
        x = (x.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        x = x.to(tl.float32)
    if FP8_INPUT:
        in_scale = tl.load(in_scale_ptr + (r // TILE_COLS)[:, None] * in_scale_stride_r
                           + c[None, :] * in_scale_stride_c, mask=mask, other=1.0)
        x = x * in_scale
    # per row [BLOCK_ROWS, 1], or per block [1, 1]; torch.amax propagates NaN and where(NaN > 0) takes
    # 1: a tile holding a NaN gets scale 1
    amax = tl.max(tl.abs(x), 1, keep_dims=True)
    has_nan = tl.max((x != x).to(tl.int32), 1, keep_dims=True)
    if WHOLE_BLOCK:
        amax = tl.max(amax, 0, keep_dims=True)
        has_nan = tl.max(has_nan, 0, keep_dims=True)
    scale = _div_rn(amax, tl.full(amax.shape, _E4M3_MAX, tl.float32), INTERPRETED)
    scale = tl.where((scale > 0) & (has_nan == 0), scale, 1.0)
    y = _div_rn(x, tl.broadcast_to(scale, x.shape), INTERPRETED)
    y = tl.clamp(y, -_E4M3_MAX, _E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)
    q_ptrs = q_ptr + r[:, None] * cols + c[None, :]
    if INTERPRETED:
        tl.store(q_ptrs, _e4m3_bits(y).to(tl.uint8), mask=mask)
    else:
        tl.store(q_ptrs, y.to(tl.float8e4nv, fp_downcast_rounding="rtne"), mask=mask)
    if WHOLE_BLOCK:
        tl.store(scale_ptr + pid_r * scale_stride_r + pid_c * scale_stride_c + tl.zeros([1, 1], tl.int32), scale)
    else:
        tl.store(scale_ptr + r[:, None] * scale_stride_r + pid_c * scale_stride_c, scale, mask=row_ok[:, None])


@functools.cache
def _has_e4m3(device: torch.device) -> bool:
    """Triton's e4m3 type needs compute capability 8.9 or later (Ada, Hopper, Blackwell)."""
    return device.type == "cpu" or torch.cuda.get_device_capability(device) >= (8, 9)


def supports(t: torch.Tensor) -> bool:
    """Whether the kernels take ``t``: a non-empty 2-D float32/bf16/fp16 tensor (or e4m3, the input of
    :func:`requantize_transposed`) on a device with e4m3."""
    return (t.dim() == 2 and t.dtype in (*_FUSED_DTYPES, FP8_DTYPE) and t.numel() > 0
            and _has_e4m3(t.device))


def _launch(x: torch.Tensor, in_scale: torch.Tensor | None, whole_block: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    tiles_r, tiles_c = (math.ceil(rows / TILE) if whole_block else rows), math.ceil(cols / TILE)
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=x.device)
    if whole_block:  # [ceil(rows/128), ceil(cols/128)], row-major like the hub's weight_scale_inv
        scale = torch.empty(tiles_r, tiles_c, dtype=torch.float32, device=x.device)
    else:  # [rows, tiles] stored column by column, as cuBLASLt reads 1x128 scales
        scale = torch.empty(tiles_c, tiles_r, dtype=torch.float32, device=x.device).t()
    interpreted = x.device.type == "cpu"  # only under the interpreter (module docstring)
    # 1x128 tiles: 32 rows a program, or 64 when the rows are what is contiguous in memory (a transposed
    # view), so that each column's read spans 128 bytes or more
    block_rows = TILE if whole_block else 64 if x.stride(1) != 1 else 32
    grid = (triton.cdiv(rows, block_rows), tiles_c)
    s_in = in_scale if in_scale is not None else scale  # not read without FP8_INPUT
    _quantize_tiles_kernel[grid](
        x.view(torch.int16) if interpreted and x.dtype == torch.bfloat16 else x, s_in,
        q.view(torch.uint8) if interpreted else q, scale,
        rows, cols, x.stride(0), x.stride(1), s_in.stride(0), s_in.stride(1), scale.stride(0), scale.stride(1),
        BLOCK_ROWS=block_rows, TILE_COLS=TILE, WHOLE_BLOCK=whole_block, FP8_INPUT=in_scale is not None,
        INTERPRETED=interpreted, BF16_BITS=interpreted and x.dtype == torch.bfloat16,
        num_warps=4 if block_rows == 32 else 8,
    )
    return q, scale


def quantize_tiles(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_blockwise(x, block, check_finite=False)`` for ``block`` (1, 128) or (128, 128), in one
    pass over ``x`` (any strides: a transposed view is read in place). Returns ``(q, scale)``: ``q`` a
    contiguous ``[rows, cols]`` e4m3 tensor, ``scale`` float32 with the values of ``quantize_blockwise``'s
    (1x128 scales column by column, see the module docstring)."""
    if tuple(block) not in ((1, TILE), (TILE, TILE)):
        raise ValueError(f"quantize_tiles: block must be (1, {TILE}) or ({TILE}, {TILE}), got {tuple(block)}")
    if not supports(x) or x.dtype == FP8_DTYPE:
        raise ValueError(f"quantize_tiles: need a non-empty 2-D float32/bf16/fp16 tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    return _launch(x.detach(), None, whole_block=block[0] == TILE)


def requantize_transposed(x_q: torch.Tensor, x_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Xᵀ`` in 1x128 tiles along X's rows, from X's 1x128-tiled FP8 copy ``(x_q [M, K], x_s [M,
    ceil(K/128)])``: the values of ``quantize_blockwise(dequantize_blockwise(x_q, x_s, (1, 128)).t(),
    (1, 128))`` (the dequantisation in float32, as there), returned as ``([K, M] e4m3, [K, ceil(M/128)]
    scales)``."""
    m, k = x_q.shape
    if x_q.dtype != FP8_DTYPE or x_q.dim() != 2 or x_q.numel() == 0 or tuple(x_s.shape) != (m, math.ceil(k / TILE)):
        raise ValueError(f"requantize_transposed: need a non-empty 2-D {FP8_DTYPE} x_q and scales [M, ceil(K/128)], "
                         f"got {x_q.dtype} {tuple(x_q.shape)} and {tuple(x_s.shape)}")
    return _launch(x_q.t(), x_s.float().t(), whole_block=False)
