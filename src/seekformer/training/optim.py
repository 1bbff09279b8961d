"""AdamW with decayed / non-decayed parameter groups, and the step schedules of a run.

Every schedule is a pure function of the optimizer step, so a resumed run needs nothing but the
step to continue with the same learning rate, MTP weight and bias-update speed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .run_config import BalanceSection, MTPSection, OptimSection, ScheduleSection


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (linear, expert and embedding weights) are decayed; norms and biases are not."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    # fused AdamW exists on CPU and CUDA and is the fastest of the three implementations on both
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True
    )


def lr_factor(step: int, total: int, cfg: ScheduleSection, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based) of `total`.

    Linear warmup over `warmup_steps`, then cosine from 1 to `min_ratio` at the last step, or
    warmup-stable-decay: 1 until the last `decay_fraction` of the steps, then linear to `min_ratio`.
    """
    warmup = min(cfg.warmup_steps, total)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "cosine":
        span = max(total - 1 - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.kind == "wsd":
        decay_steps = round(cfg.decay_fraction * total)
        decay_start = max(total - decay_steps, warmup)
        if step < decay_start or decay_steps == 0:
            return 1.0
        progress = min((step - decay_start + 1) / max(total - decay_start, 1), 1.0)
        return 1 - (1 - min_ratio) * progress
    raise ValueError(f"unknown schedule kind {cfg.kind!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def mtp_weight(step: int, total: int, cfg: MTPSection) -> float:
    """lambda: `weight` for the first `switch_fraction` of the steps, then `weight_after` (V3: 0.3 -> 0.1)."""
    return cfg.weight if step < cfg.switch_fraction * total else cfg.weight_after


def bias_update_speed(step: int, total: int, cfg: BalanceSection) -> float:
    """gamma: `bias_update_speed` for the first `bias_update_until` of the steps, then 0 (V3)."""
    return cfg.bias_update_speed if step < cfg.bias_update_until * total else 0.0
