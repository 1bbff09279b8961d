"""FP8 weights kept in memory for inference (``load_model(DIR_FP8, keep_fp8=True)``).

``keep_fp8_weights(model)`` swaps, on a built (usually meta-device) model, the layers the hub stores in
FP8 — attention projections, dense and shared MLPs (``FP8Linear``) and the routed experts
(``FP8Experts``) — for versions that hold ``float8_e4m3fn`` weights with their float32
``weight_scale_inv`` blocks under the hub's names, so the checkpoint loads into them unchanged and
weight memory is about half of bf16 (1 byte per weight plus 4 bytes per 128x128 block).

The matrix products dequantise one band of 128-row weight blocks at a time, in float32 then cast
once to the activation dtype (as the load-time dequantisation does), and multiply in that dtype: the
outputs equal those of the model loaded dequantised, and no dense copy of a whole weight is made.
Activations are not quantised (weight-only FP8).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..model.moe import Experts
from .fp8 import DEFAULT_BLOCK_SIZE, FP8_DTYPE, FP8Linear, default_fp8_selector, dequantize_blockwise

_BAND_BYTES = 1 << 20  # the dequantised band (float32 work copy) is kept near 1 MiB: it stays in cache


def blockwise_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                         bias: torch.Tensor | None = None,
                         block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """``x Wᵀ (+ bias)`` in ``x.dtype`` for an FP8 ``weight [N, K]`` with per-block ``scale_inv``,
    dequantising bands of whole block rows of W inside the product."""
    n, k = weight.shape
    band = max(block_size[0], _BAND_BYTES // (4 * k) // block_size[0] * block_size[0])
    x2 = x.reshape(-1, k)
    if n <= band:
        out = F.linear(x2, dequantize_blockwise(weight, scale_inv, block_size, x.dtype))
    else:
        out_t = x2.new_empty(n, x2.shape[0])  # [N, M]: each band's rows are contiguous
        for r0 in range(0, n, band):
            r1 = min(r0 + band, n)
            scales = scale_inv[r0 // block_size[0] : math.ceil(r1 / block_size[0])]
            w = dequantize_blockwise(weight[r0:r1], scales, block_size, x.dtype)
            torch.mm(w, x2.t(), out=out_t[r0:r1])
        out = out_t.t()
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], n)


class KeptFP8Linear(FP8Linear):
    """``FP8Linear`` whose forward is the weight-only blockwise product above (no activation
    quantisation), for inference from FP8 weights held in memory."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blockwise_fp8_linear(x, self.weight, self.weight_scale_inv, self.bias, self.block_size)


class FP8Experts(Experts):
    """Routed experts holding e4m3 weights: ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` with
    ``gate_up_proj_scale_inv [E, 2·ceil(I/128), ceil(H/128)]`` (the gate's block rows, then the up
    projection's: the hub quantises the two separately) and ``down_proj_scale_inv [E, ceil(H/128),
    ceil(I/128)]``. Each expert's weights are dequantised when it has tokens."""

    def __init__(self, config: ModelConfig, block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE):
        super().__init__(config)
        E, H, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        b0, b1 = block_size
        self.block_size = block_size
        device = self.gate_up_proj.device
        del self.gate_up_proj, self.down_proj
        self.register_buffer("gate_up_proj", torch.zeros(E, 2 * I, H, dtype=FP8_DTYPE, device=device))
        self.register_buffer("down_proj", torch.zeros(E, H, I, dtype=FP8_DTYPE, device=device))
        self.register_buffer("gate_up_proj_scale_inv",
                             torch.ones(E, 2 * math.ceil(I / b0), math.ceil(H / b1), device=device))
        self.register_buffer("down_proj_scale_inv", torch.ones(E, math.ceil(H / b0), math.ceil(I / b1), device=device))

    def resolve_implementation(self, device: torch.device, dtype: torch.dtype) -> str:
        return "autograd_loop"

    def _apply(self, fn, recurse=True):
        kept = {k: self._buffers[k] for k in ("gate_up_proj", "down_proj", "gate_up_proj_scale_inv",
                                               "down_proj_scale_inv")}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:  # dtype casts of the model leave FP8 weights and their scales alone
                self._buffers[name] = old.to(new.device)
        return self

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``expert``'s dense ``gate_up [2I, H]`` and ``down [H, I]`` in ``dtype``."""
        inter, n_scale = self.intermediate, self.gate_up_proj_scale_inv.shape[1] // 2
        w, s = self.gate_up_proj[expert], self.gate_up_proj_scale_inv[expert]
        gate_up = torch.cat((dequantize_blockwise(w[:inter], s[:n_scale], self.block_size, dtype),
                             dequantize_blockwise(w[inter:], s[n_scale:], self.block_size, dtype)))
        down = dequantize_blockwise(self.down_proj[expert], self.down_proj_scale_inv[expert], self.block_size, dtype)
        return gate_up, down

    def _autograd_loop(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(xs)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                gate_up, down = self.expert_weights(expert, xs.dtype)
                gate, up = F.linear(xs[start : start + count], gate_up).chunk(2, dim=-1)
                out[start : start + count] = F.linear(F.silu(gate) * up, down)
                start += count
        return out


def keep_fp8_weights(model: nn.Module, block_size: tuple[int, int] = DEFAULT_BLOCK_SIZE) -> list[str]:
    """Swap, in place, the layers the hub stores in FP8 (``default_fp8_selector``) for ``KeptFP8Linear``
    and every routed ``Experts`` for ``FP8Experts``, with zero FP8 weights to be loaded into; returns
    the swapped module names. Build the model on the meta device, swap, then allocate and load."""
    swapped = []
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        device = next(module.parameters(), torch.empty(0)).device
        if type(module) is nn.Linear and default_fp8_selector(f"{name}.weight"):
            new: nn.Module = KeptFP8Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                           block_size=block_size, device=device)
        elif type(module) is Experts:
            with torch.device(device):
                new = FP8Experts(model.config, block_size)
        else:
            continue
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        swapped.append(name)
    return swapped
