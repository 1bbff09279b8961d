"""DeepSeek-V3 fine-grained FP8 (e4m3): 128x128 weight blocks, 1x128 activation tiles.

Hub layout of a quantized linear ``<name>``:

* ``<name>.weight``           ``float8_e4m3fn``, shape ``[out, in]``
* ``<name>.weight_scale_inv`` ``float32``, shape ``[ceil(out/128), ceil(in/128)]``

with ``W[i, j] = weight[i, j] * weight_scale_inv[i // 128, j // 128]``. Edge blocks may be partial.

Matrix products are simulated faithfully on any device: activations are quantized per 1x128 tile,
weights per 128x128 block, both are dequantized to float32 and multiplied with float32 accumulation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import fp8_block_size

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "ACT_AMAX_MIN",
    "DEFAULT_BLOCK_SIZE",
    "FP8Linear",
    "default_fp8_selector",
    "dequantize_activation",
    "dequantize_blockwise",
    "dequantize_state_dict_fp8",
    "fp8_linear",
    "hub_quantization_config",
    "parse_quantization_config",
    "quantize_activation",
    "quantize_blockwise",
    "quantize_state_dict_fp8",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
ACT_AMAX_MIN = 1e-4  # activation tiles: amax is clamped to at least this before scaling
DEFAULT_BLOCK_SIZE: tuple[int, int] = (128, 128)
SCALE_SUFFIX = "_scale_inv"  # "<name>.weight" -> "<name>.weight_scale_inv"

_FP8_DTYPES = tuple(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
)
# Rows of float32 temporaries per band are bounded to about this many elements (64 MiB).
_BAND_ELEMENTS = 1 << 24


def _is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in _FP8_DTYPES


def _check_block_size(block_size: tuple[int, int] | list[int]) -> tuple[int, int]:
    bs = tuple(int(b) for b in block_size)
    if len(bs) != 2 or min(bs) <= 0:
        raise ValueError(f"block_size must be two positive ints, got {tuple(block_size)}")
    return bs  # type: ignore[return-value]


def _grid(shape: tuple[int, int] | torch.Size, block_size: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block_size[0]), math.ceil(shape[1] / block_size[1])


def _band_rows(cols: int, block_rows: int) -> int:
    """Rows per band: a multiple of the block height keeping a band near ``_BAND_ELEMENTS`` elements."""
    return max(block_rows, (_BAND_ELEMENTS // max(cols, 1)) // block_rows * block_rows)


def _as_blocks(t: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad a 2-D tensor to whole blocks and view it as ``[nb0, b0, nb1, b1]``."""
    b0, b1 = block_size
    rows, cols = t.shape
    nb0, nb1 = _grid(t.shape, block_size)
    pad_r, pad_c = nb0 * b0 - rows, nb1 * b1 - cols
    if pad_r or pad_c:
        t = F.pad(t, (0, pad_c, 0, pad_r))
    return t.view(nb0, b0, nb1, b1)


def _scale_blocks_(t: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int]) -> torch.Tensor:
    """Multiply each block of the contiguous float 2-D ``t`` by ``scale[bi, bj]``.

    ``t`` may be overwritten (it must be a temporary). Returns a ``[rows, cols]`` tensor (a crop of
    the padded blocks when the shape is not a whole number of blocks).
    """
    rows, cols = t.shape
    blocks = _as_blocks(t, block_size)  # a view of ``t`` unless padding was needed
    blocks.mul_(scale[:, None, :, None])
    return blocks.reshape(blocks.shape[0] * blocks.shape[1], -1)[:rows, :cols]


# ---------------------------------------------------------------------------------------------------
# weights: 128x128 blocks
# ---------------------------------------------------------------------------------------------------


def dequantize_blockwise(
    weight_fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: tuple[int, int] | list[int] = DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Return ``weight_fp8 * scale_inv`` broadcast per block, as ``dtype``.

    The product is formed in float32 (float64 when ``dtype`` is float64) and cast once, as the
    reference kernels do. Work is done in bands of block rows, so besides the output only a bounded
    temporary is allocated.
    """
    bs = _check_block_size(block_size)
    if weight_fp8.dim() != 2 or not _is_fp8(weight_fp8):
        raise ValueError(
            "dequantize_blockwise: weight must be a 2-D float8 tensor (float8_e4m3fn), got "
            f"{weight_fp8.dtype} with shape {tuple(weight_fp8.shape)}"
        )
    expected = _grid(weight_fp8.shape, bs)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"dequantize_blockwise: scale_inv shape {tuple(scale_inv.shape)} does not match weight shape "
            f"{tuple(weight_fp8.shape)} with block_size {bs}: expected {expected} = "
            f"(ceil({weight_fp8.shape[0]}/{bs[0]}), ceil({weight_fp8.shape[1]}/{bs[1]}))"
        )
    if not scale_inv.is_floating_point() or _is_fp8(scale_inv):
        raise ValueError(f"dequantize_blockwise: scale_inv must be float32, got {scale_inv.dtype}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    scale = scale_inv.to(device=weight_fp8.device, dtype=work)
    rows, cols = weight_fp8.shape
    band = _band_rows(cols, bs[0])
    if rows <= band:
        return _scale_blocks_(weight_fp8.to(work), scale, bs).to(dtype).contiguous()
    out = torch.empty(rows, cols, dtype=dtype, device=weight_fp8.device)
    for r0 in range(0, rows, band):  # bands of whole block rows, not blocks
        r1 = min(r0 + band, rows)
        s = scale[r0 // bs[0] : math.ceil(r1 / bs[0])]
        out[r0:r1] = _scale_blocks_(weight_fp8[r0:r1].to(work), s, bs)
    return out


def quantize_blockwise(
    weight: torch.Tensor, block_size: tuple[int, int] | list[int] = DEFAULT_BLOCK_SIZE, check_finite: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D float weight to e4m3 with one float32 scale per block.

    ``scale_inv = amax(|block|) / 448`` (1 for all-zero blocks) and ``fp8 = cast(block / scale_inv)``,
    so each block's largest magnitude lands on 448. Returns ``(weight_fp8, scale_inv)`` in the hub
    layout; :func:`dequantize_blockwise` inverts it up to e4m3 rounding.

    Non-finite values raise a ``ValueError`` naming the block; ``check_finite=False`` skips that check
    (it waits for the device: the training GEMMs skip it and let a NaN reach the loss instead). Each
    band of rows is read three times in its own dtype (block maxima, block minima, the division into
    a float32 temporary).
    """
    bs = _check_block_size(block_size)
    if weight.dim() != 2 or not weight.is_floating_point() or _is_fp8(weight):
        raise ValueError(
            "quantize_blockwise: weight must be a 2-D float tensor (not float8), got "
            f"{weight.dtype} with shape {tuple(weight.shape)}"
        )
    weight = weight.detach()
    rows, cols = weight.shape
    nb0, nb1 = _grid(weight.shape, bs)
    if weight.numel() == 0:
        return (torch.empty(rows, cols, dtype=FP8_DTYPE, device=weight.device),
                torch.ones(nb0, nb1, dtype=torch.float32, device=weight.device))
    band = _band_rows(cols, bs[0])
    if rows <= band:
        return _quantize_band(weight, bs, check_finite, weight.shape, 0)
    q = torch.empty(rows, cols, dtype=FP8_DTYPE, device=weight.device)
    scale_inv = torch.empty(nb0, nb1, dtype=torch.float32, device=weight.device)
    for r0 in range(0, rows, band):  # bands of whole block rows, not blocks
        q_band, scale = _quantize_band(weight[r0 : r0 + band], bs, check_finite, weight.shape, r0 // bs[0])
        q[r0 : r0 + band] = q_band
        scale_inv[r0 // bs[0] : r0 // bs[0] + scale.shape[0]] = scale
    return q, scale_inv


def _quantize_band(w: torch.Tensor, bs: tuple[int, int], check_finite: bool, shape: torch.Size,
                   first_block_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 rows, their scales) of a band of whole block rows of a weight of ``shape``."""
    rows, cols = w.shape
    w = w.float() if w.dtype == torch.float64 else w.contiguous()
    blocks = _as_blocks(w, bs)  # a view of the band unless padding was needed
    amax = torch.maximum(blocks.amax(dim=(1, 3)), -blocks.amin(dim=(1, 3))).float()  # max |x|, no |x| tensor
    if check_finite and not torch.isfinite(amax).all():
        bad = (~torch.isfinite(amax)).nonzero()[0].tolist()
        raise ValueError(
            f"quantize_blockwise: non-finite values in block {(bad[0] + first_block_row, bad[1])} "
            f"of weight with shape {tuple(shape)}"
        )
    # divided by a tensor: with a Python number, CUDA multiplies by its float32 reciprocal instead, which
    # differs from amax / 448 in the last bit for about half of all amax (CPU divides either way)
    scale = amax / amax.new_full((), FP8_MAX)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero (or underflowing) blocks
    scaled = blocks / scale[:, None, :, None]  # float32 (the scale is): the band's only temporary
    q = scaled.clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.view(-1, blocks.shape[2] * bs[1])
    if q.shape != (rows, cols):
        q = q[:rows, :cols].contiguous()
    return q, scale


# ---------------------------------------------------------------------------------------------------
# activations: 1x128 tiles along the last dimension
# ---------------------------------------------------------------------------------------------------


def _tiles(x: torch.Tensor, tile: int) -> torch.Tensor:
    """Zero-pad the last dim to whole tiles and view as ``[..., n_tiles, tile]``."""
    k = x.shape[-1]
    n = math.ceil(k / tile)
    if n * tile != k:
        x = F.pad(x, (0, n * tile - k))
    return x.unflatten(-1, (n, tile))


def quantize_activation(x: torch.Tensor, tile: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to e4m3 with one scale per 1 x ``tile`` group along the last dim.

    ``scale = max(amax, 1e-4) / 448``. Returns ``(x_fp8, scales)`` with ``x_fp8`` shaped like ``x`` and
    float32 ``scales`` of shape ``[..., ceil(K / tile)]``. A partial last tile is allowed.
    """
    if tile <= 0:
        raise ValueError(f"quantize_activation: tile must be positive, got {tile}")
    if x.dim() < 1 or not x.is_floating_point() or _is_fp8(x):
        raise ValueError(
            f"quantize_activation: x must be a float tensor (not float8), got {x.dtype} {tuple(x.shape)}"
        )
    k = x.shape[-1]
    t = _tiles(x.detach().to(torch.float32), tile)  # [..., n, tile]
    amax = t.abs().amax(dim=-1).clamp_min(ACT_AMAX_MIN)  # [..., n]
    scales = amax / amax.new_full((), FP8_MAX)  # a divisor tensor: CUDA divides as the CPU does (see above)
    q = (t / scales.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.flatten(-2)[..., :k], scales


def dequantize_activation(
    x_fp8: torch.Tensor, scales: torch.Tensor, tile: int = 128, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_activation`: ``x_fp8 * scales`` per tile, as ``dtype``."""
    if not _is_fp8(x_fp8):
        raise ValueError(f"dequantize_activation: x must be float8, got {x_fp8.dtype} {tuple(x_fp8.shape)}")
    expected = (*x_fp8.shape[:-1], math.ceil(x_fp8.shape[-1] / tile))
    if tuple(scales.shape) != expected:
        raise ValueError(
            f"dequantize_activation: scales shape {tuple(scales.shape)} does not match x shape "
            f"{tuple(x_fp8.shape)} with tile {tile}: expected {expected}"
        )
    k = x_fp8.shape[-1]
    work = torch.float64 if dtype == torch.float64 else torch.float32
    t = _tiles(x_fp8.to(work), tile) * scales.to(work).unsqueeze(-1)
    return t.flatten(-2)[..., :k].to(dtype)


# ---------------------------------------------------------------------------------------------------
# FP8 linear
# ---------------------------------------------------------------------------------------------------


def fp8_linear(
    x: torch.Tensor,
    weight_fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    block_size: tuple[int, int] | list[int] = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """``y = x W^T (+ bias)`` with 1x128-tile FP8 activations, block FP8 weights, float32 accumulation.

    Device-agnostic simulation of the V3 GEMM numerics: both operands are quantized to e4m3 with their
    fine-grained scales, dequantized to float32 and multiplied in float32; the result has ``x.dtype``.
    The activation quantization is straight-through for autograd (the gradient w.r.t. ``x`` is
    ``grad_y @ W``); the FP8 weight receives no gradient.
    """
    bs = _check_block_size(block_size)
    if x.shape[-1] != weight_fp8.shape[-1]:
        raise ValueError(
            f"fp8_linear: x last dim {x.shape[-1]} does not match weight shape {tuple(weight_fp8.shape)}"
        )
    w = dequantize_blockwise(weight_fp8, scale_inv, bs, torch.float32)  # [out, in]
    xq, xs = quantize_activation(x, tile=bs[1])
    x32 = dequantize_activation(xq, xs, tile=bs[1])
    if x.requires_grad:
        x32 = x32 + (x.float() - x.float().detach())  # straight-through estimator
    y = x32 @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class FP8Linear(nn.Module):
    """Linear layer with a hub-format FP8 weight: buffers ``weight`` (e4m3) and ``weight_scale_inv``.

    Dtype conversions of the module (``.to(torch.bfloat16)``, ``.half()``, ...) leave these two
    buffers in their storage dtypes; device moves apply. An optional ``bias`` stays a parameter.
    """

    weight: torch.Tensor
    weight_scale_inv: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        block_size: tuple[int, int] | list[int] = DEFAULT_BLOCK_SIZE,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = _check_block_size(block_size)
        grid = _grid((out_features, in_features), self.block_size)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale_inv", torch.ones(grid, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, block_size: tuple[int, int] | list[int] = DEFAULT_BLOCK_SIZE
    ) -> FP8Linear:
        """Quantize an ``nn.Linear`` (its weight; the bias is kept as is)."""
        w = linear.weight.detach()
        mod = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            block_size=block_size,
            device=w.device,
            dtype=w.dtype,
        )
        q, s = quantize_blockwise(w, mod.block_size)
        mod.weight.copy_(q)
        mod.weight_scale_inv.copy_(s)
        if linear.bias is not None:
            with torch.no_grad():
                mod.bias.copy_(linear.bias)
        return mod

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense ``[out, in]`` tensor of ``dtype``."""
        return dequantize_blockwise(self.weight, self.weight_scale_inv, self.block_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.bias, self.block_size)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, block_size={self.block_size}"
        )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FP8Linear:
        kept = {k: self._buffers[k] for k in ("weight", "weight_scale_inv")}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)  # keep the storage dtype, take the device
        return self

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        w = state_dict.get(prefix + "weight")
        if isinstance(w, torch.Tensor) and not _is_fp8(w):
            error_msgs.append(
                f"{prefix}weight: FP8Linear expects a float8 weight with {prefix}weight_scale_inv, got "
                f"{w.dtype} {tuple(w.shape)} (quantize it with quantize_blockwise first)"
            )
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


# ---------------------------------------------------------------------------------------------------
# state dicts and config
# ---------------------------------------------------------------------------------------------------

_ATTN_PROJ = (
    "q_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "k_proj",
    "v_proj",
)
_MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
_SELECT_RE = re.compile(
    r"(?:^|\.)(?:self_attn\.(?:" + "|".join(_ATTN_PROJ) + r")"
    r"|mlp\.(?:experts\.\d+\.|shared_experts\.)?(?:" + "|".join(_MLP_PROJ) + r"))\.weight$"
)
_EXCLUDE = ("embed_tokens", "lm_head", "norm", "eh_proj", "shared_head", "mlp.gate.weight")


def default_fp8_selector(key: str) -> bool:
    """The hub rule: attention and MLP/expert projection weights are FP8; nothing else is.

    Embeddings, ``lm_head``, norms, the router ``mlp.gate.weight``, and the MTP ``eh_proj`` /
    ``shared_head`` stay in high precision.
    """
    if any(e in key for e in _EXCLUDE):
        return False
    return _SELECT_RE.search(key) is not None


def quantize_state_dict_fp8(
    state_dict: Mapping[str, torch.Tensor],
    should_quantize: Callable[[str], bool] | None = None,
    block_size: tuple[int, int] | list[int] = DEFAULT_BLOCK_SIZE,
) -> dict[str, torch.Tensor]:
    """Return a new dict where each selected ``*.weight`` is FP8 plus ``*.weight_scale_inv``.

    ``should_quantize(key)`` is asked for keys ending in ``.weight`` (default:
    :func:`default_fp8_selector`). A selected tensor must be a 2-D float tensor; one that is already
    float8 is passed through unchanged (with its scale), so applying this twice is harmless. Order is
    kept, each scale following its weight.
    """
    bs = _check_block_size(block_size)
    select = should_quantize if should_quantize is not None else default_fp8_selector
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        if key.endswith(".weight") and select(key) and not _is_fp8(t):
            if t.dim() != 2 or not t.is_floating_point():
                raise ValueError(
                    f"quantize_state_dict_fp8: {key} was selected but is {t.dtype} with shape "
                    f"{tuple(t.shape)}; only 2-D float weights can be block-quantized"
                )
            scale_key = key + SCALE_SUFFIX
            if scale_key in state_dict:
                raise ValueError(
                    f"quantize_state_dict_fp8: {scale_key} already exists but {key} is {t.dtype}"
                )
            out[key], out[scale_key] = quantize_blockwise(t, bs)
        else:
            out[key] = t
    return out


def dequantize_state_dict_fp8(
    state_dict: Mapping[str, torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
    block_size: tuple[int, int] | list[int] = DEFAULT_BLOCK_SIZE,
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`quantize_state_dict_fp8`: every ``X.weight`` with ``X.weight_scale_inv`` becomes
    a dense ``dtype`` tensor and the scale key is dropped. A float8 weight without a scale, or a scale
    without its weight, raises ``ValueError`` naming the key."""
    bs = _check_block_size(block_size)
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        if key.endswith(".weight" + SCALE_SUFFIX):
            wkey = key[: -len(SCALE_SUFFIX)]
            if wkey not in state_dict:
                raise ValueError(f"dequantize_state_dict_fp8: {key} has no matching {wkey}")
            continue
        scale = state_dict.get(key + SCALE_SUFFIX)
        if scale is not None:
            out[key] = dequantize_blockwise(t, scale, bs, dtype)
        elif _is_fp8(t):
            raise ValueError(
                f"dequantize_state_dict_fp8: {key} is {t.dtype} but {key}{SCALE_SUFFIX} is missing"
            )
        else:
            out[key] = t
    return out


def hub_quantization_config(block_size: tuple[int, int] | list[int] = DEFAULT_BLOCK_SIZE) -> dict[str, Any]:
    """The ``quantization_config`` entry of a DeepSeek-V3 ``config.json``."""
    bs = _check_block_size(block_size)
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [bs[0], bs[1]],
    }


# The quantization settings have one validator, shared with config.json's (a ConfigError is a ValueError):
parse_quantization_config = fp8_block_size
