"""Building blocks shared by every generation: RMSNorm, the SwiGLU MLP and rotary embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, yarn_get_mscale
from . import bf16_rows


def compute_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype products of `dtype` tensors on `device_type` run in: the autocast dtype while autocast
    is on for that device (the residual stream then stays float32), else `dtype`."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, cast back before the weight (as DeepSeek does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # the same float32 arithmetic in fewer operators (outputs and gradients equal bit for bit)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        if not torch.is_grad_enabled():
            if dtype == torch.bfloat16 and self.weight.dtype == dtype and x.device.type == "cpu" \
                    and bf16_rows.available():  # one call instead of five small operators (tested within a rounding)
                return bf16_rows.rms_norm(x, self.weight, self.eps)
            # PyTorch's fused norm: bit for bit the formula's values (tested)
            return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(dtype)
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin multiplier (YaRN's attention factor, else 1).

    YaRN follows the reference formulas: frequencies blend interpolation (divided by `factor`) and
    extrapolation with a linear ramp between the correction dims of `beta_fast`/`beta_slow`.
    """
    dim, base = config.rope_dim, float(config.rope_theta)
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    inv_freq = 1.0 / (base**exponents)
    if config.rope_type != "yarn":
        return inv_freq, 1.0
    rs = config.rope_scaling
    factor = float(rs["factor"])
    original = rs.get("original_max_position_embeddings") or config.max_position_embeddings
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (inv_freq / factor) * ramp + inv_freq * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, half width ([..., dim/2]), in float32."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self) -> None:
        """Recompute after `to_empty` (loading builds the model on the meta device)."""
        inv_freq, self.attention_factor = rope_frequencies(self.config)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()  # [..., T, dim/2]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def rope_positions(attention_mask: torch.Tensor | None, start: torch.Tensor, num_new: int) -> torch.Tensor:
    """RoPE positions [B, T] of `num_new` tokens following `start` [B, 1] real tokens per row.

    Positions count real tokens only: with `attention_mask` [B, T] (1 = token, 0 = padding) a real
    token's position is `start` plus the real tokens before it among the new ones, and a pad takes
    its next real neighbour's, clamped at `start` (left padding: `start`; right padding: the last).
    """
    if attention_mask is None:
        return start + torch.arange(num_new, device=start.device)
    return start + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairwise: bool) -> torch.Tensor:
    """Rotate the last dim of x [B, T, H, D] by cos/sin [B, T, D/2].

    `pairwise` rotates adjacent pairs (x0, x1), (x2, x3)... (DeepSeek-V2/V3 weights); otherwise the two
    halves (x_i, x_{i+D/2}) as in Llama. Both write the rotated halves back as [first; second]; since
    queries and keys get the same layout their dot products equal the interleaved form's.

    Without autograd, pairs rotate as complex numbers times cos + i sin (DeepSeek's own form): the
    same values in a few contiguous passes (bit for bit in bf16 and float64; in float32 too where the
    vectorised complex product covers every pair, else, for the pairs of its scalar tail, within
    one rounding of the products: tested), where the real form over the strided halves of a bf16
    prefill's queries (4,096 tokens, 16 heads) took 2-3x as long. Training keeps the real form,
    whose backward rounds its sums in its own order (the complex one moved the grad norm
    of a 2-process run against one process by ~1e-4).
    """
    inference = not (torch.is_grad_enabled() and x.requires_grad)
    if (pairwise and inference and x.dtype == torch.bfloat16 and cos.dtype == torch.float32 and x.device.type == "cpu"
            and cos.shape[:-1] == x.shape[:-2] and bf16_rows.available()):
        return bf16_rows.rope_pairs(x, cos, sin)  # the complex form's values in one call (tested)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    half = x.shape[-1] // 2
    if pairwise and inference:
        real = x.to(torch.promote_types(x.dtype, torch.float32)).contiguous()
        if real.storage_offset() % 2:  # a complex view needs an even offset (e.g. batch-1 decode's k_pe)
            real = real.clone()
        pairs = torch.view_as_complex(real.view(*x.shape[:-1], half, 2))
        rotated = torch.view_as_real(pairs * torch.complex(cos, sin)).to(x.dtype)  # [..., D/2, 2]
        return rotated.transpose(-1, -2).reshape(x.shape)
    if pairwise:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x[..., :half], x[..., half:]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
