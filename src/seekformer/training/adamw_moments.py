"""AdamW whose moments are stored in a low-precision dtype (bf16) while the weights stay float32.

DeepSeek-V3 (report §3.3) keeps AdamW's first and second moments in BF16 and the master weights and
gradients in FP32, which takes optimizer state from 8 to 4 bytes per parameter. torch's AdamW cannot
do this: its state always has the parameter's dtype, and `Optimizer.load_state_dict` casts every
floating-point state tensor back to the parameter's dtype.

`AdamWLowPrecisionMoments` does one parameter at a time (so the float32 work memory is that of the
largest parameter, not of the model):

    p      <- p * (1 - lr * weight_decay)                     decoupled weight decay, as torch's AdamW
    m32    <- lerp(float32(m), g, 1 - beta1)                  the moments of this step, in float32
    v32    <- beta2 * float32(v) + (1 - beta2) * g * g
    p      <- p - lr / (1 - beta1^t) * m32 / (sqrt(v32) / sqrt(1 - beta2^t) + eps)
    m, v   <- round_to_nearest_even(m32), round_to_nearest_even(v32)   stored in `moment_dtype`

The update uses this step's float32 moments (what a fused kernel holding them in registers would do);
only the stored state is rounded, round-to-nearest-even (no stochastic rounding). A change of a moment
smaller than half a bf16 ulp (2^-9 of it) is therefore lost: with beta2 > 1 - 2^-9 (the common 0.999)
v cannot decay while gradients shrink (0.999 v rounds back to v), where stochastic rounding or float32
moments are needed; with V3's beta2 = 0.95 (this project's default) and beta1 = 0.9 it can.
Checkpoints hold the moments in their dtype, and loading restores that dtype, so a resumed run
continues bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


class AdamWLowPrecisionMoments(torch.optim.Optimizer):
    """AdamW (torch's update rule and state keys: `step`, `exp_avg`, `exp_avg_sq`) with the two moments
    stored in `moment_dtype`; float32 (or whatever the parameters are) for everything else."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, moment_dtype: torch.dtype = torch.bfloat16):
        if not lr > 0 or not eps > 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamWLowPrecisionMoments: need lr > 0, eps > 0, weight_decay >= 0 and betas in "
                             f"[0, 1); got lr={lr}, eps={eps}, weight_decay={weight_decay}, betas={betas}")
        if not moment_dtype.is_floating_point:
            raise ValueError(f"AdamWLowPrecisionMoments: moment_dtype must be floating-point, got {moment_dtype}")
        # not a group default: param groups are saved as JSON in checkpoints, a torch.dtype is not JSON
        self.moment_dtype = moment_dtype
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWLowPrecisionMoments does not take sparse gradients (use SparseAdam)")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    for key in MOMENTS:
                        state[key] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"].item()
                grad = p.grad.to(torch.float32)
                m = state["exp_avg"].to(torch.float32).lerp_(grad, 1 - beta1)
                v = state["exp_avg_sq"].to(torch.float32).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if wd:
                    p.mul_(1 - lr * wd)
                denom = v.sqrt().div_(math.sqrt(1 - beta2**t)).add_(eps)
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1 - beta1**t))
                state["exp_avg"].copy_(m)  # round to nearest even
                state["exp_avg_sq"].copy_(v)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loading casts floating-point state to the parameter's dtype; put the moments back in
        `moment_dtype` (exact for moments that were saved in it)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in MOMENTS:
                if key in state:
                    state[key] = state[key].to(self.moment_dtype)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (moments and step counters)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))
