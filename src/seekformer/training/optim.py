"""AdamW with decayed / non-decayed parameter groups, SparseAdam for Engram tables, global-norm
clipping that includes row-sparse gradients, and the step schedules of a run.

Every schedule is a pure function of the optimizer step, so a resumed run needs nothing but the
step to continue with the same learning rate, MTP weight and bias-update speed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .adamw_moments import AdamWLowPrecisionMoments
from .run_config import (
    MOMENT_DTYPES,
    BalanceSection,
    EngramSection,
    MTPSection,
    OptimSection,
    RunConfigError,
    ScheduleSection,
)


def param_groups(model: nn.Module, weight_decay: float, exclude: list[nn.Parameter] = ()) -> list[dict]:
    """Matrices (linear, expert and embedding weights) are decayed; norms and biases are not.
    Parameters in `exclude` (the Engram tables, which have their own optimizer) are left out."""
    decay, no_decay = [], []
    seen: set[int] = {id(p) for p in exclude}
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def engram_tables(model: nn.Module) -> list[nn.Parameter]:
    """The embedding tables (`table.weight`) of every Engram module of `model`, in module order."""
    from ..model.engram import Engram

    return [m.table.weight for m in model.modules() if isinstance(m, Engram) and m.table.weight.requires_grad]


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.Optimizer:
    """AdamW over every trainable parameter except the Engram tables (see `build_engram_optimizer`):
    torch's fused AdamW with float32 moments, or with `optim.moment_dtype = "bf16"` V3's bf16 moments
    (`AdamWLowPrecisionMoments`; the weights stay float32)."""
    groups = param_groups(model, cfg.weight_decay, exclude=engram_tables(model))
    if cfg.moment_dtype == "bf16":
        return AdamWLowPrecisionMoments(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                        moment_dtype=torch.bfloat16)
    if cfg.moment_dtype != "fp32":
        raise RunConfigError(f"optim.moment_dtype must be one of {', '.join(MOMENT_DTYPES)}, got {cfg.moment_dtype!r}")
    # fused AdamW exists on CPU and CUDA and is the fastest of the three implementations on both
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    optimizer.register_step_post_hook(_mark_parameters_changed)
    return optimizer


def _mark_parameters_changed(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Fused AdamW writes the parameters without bumping their version counters (torch 2.13), which
    the caches of tensors derived from weights key on (decode packs, MLA's absorbed matrices): without
    this, `generate` after a step would decode with the previous weights."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            torch.autograd.graph.increment_version(param)


def build_engram_optimizer(model: nn.Module, cfg: OptimSection, engram: EngramSection) -> torch.optim.SparseAdam | None:
    """SparseAdam over the Engram tables (None without Engram layers), as in the Engram paper: Adam at
    `lr * engram.lr_multiplier`, no weight decay. The group's `lr_scale` makes `set_lr` apply the
    multiplier. Each Engram module is switched to row-sparse gradients (`sparse_grad`), which
    SparseAdam requires: a step reads and writes only the rows the step looked up."""
    from ..model.engram import Engram

    tables = engram_tables(model)
    if not tables:
        return None
    for module in model.modules():
        if isinstance(module, Engram):
            module.sparse_grad = True
    group = {"params": tables, "lr_scale": engram.lr_multiplier}
    return torch.optim.SparseAdam([group], lr=cfg.lr * engram.lr_multiplier, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps)


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """Clip the global L2 norm of all gradients to `max_norm`; return the norm before clipping.

    `torch.nn.utils.clip_grad_norm_` cannot take sparse gradients (no sparse vector norm), so a
    row-sparse gradient (Engram tables) is coalesced in place first (accumulated micro-batches
    concatenate their rows, and repeated rows must be summed before they are squared) and enters
    the norm through its values. The gradients are scaled by torch's factor min(1, max_norm /
    (norm + 1e-6)); on CPU, where reading it costs nothing, not at all when it is 1 (a pass over every
    gradient that would change none: ~5 ms a GRPO step of the benchmark model). Otherwise this is
    exactly torch's function.
    """
    params = [p for p in parameters if p.grad is not None]
    sparse = [p for p in params if p.grad.is_sparse]
    dense = [p for p in params if not p.grad.is_sparse]
    for p in sparse:
        p.grad = p.grad.coalesce()
    values = [p.grad._values() for p in sparse]
    total = torch.nn.utils.get_total_norm([p.grad for p in dense] + values)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # the factor clip_grads_with_norm_ applies
    # reading a CPU tensor is no device sync; elsewhere the multiplication always runs, as in torch
    if total.device.type == "cpu" and torch.equal(coef, torch.ones_like(coef)):
        return total
    torch.nn.utils.clip_grads_with_norm_(dense, max_norm, total)
    for v in values:
        v.mul_(coef.to(v.device))
    return total


def lr_factor(step: int, total: int, cfg: ScheduleSection, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based) of `total`.

    Linear warmup over `warmup_steps`, then cosine (or `linear`) from 1 to `min_ratio` at the last step,
    or warmup-stable-decay: 1 until the last `decay_fraction` of the steps, then linear to `min_ratio`.
    """
    warmup = min(cfg.warmup_steps, total)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind in ("cosine", "linear"):
        span = max(total - 1 - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        if cfg.kind == "linear":
            return 1 - (1 - min_ratio) * progress
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
    """Set every group's lr to `lr` times the group's `lr_scale` (1 unless set, e.g. Engram tables)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def mtp_weight(step: int, total: int, cfg: MTPSection) -> float:
    """lambda: `weight` for the first `switch_fraction` of the steps, then `weight_after` (V3: 0.3 -> 0.1)."""
    return cfg.weight if step < cfg.switch_fraction * total else cfg.weight_after


def bias_update_speed(step: int, total: int, cfg: BalanceSection) -> float:
    """gamma: `bias_update_speed` for the first `bias_update_until` of the steps, then 0 (V3)."""
    return cfg.bias_update_speed if step < cfg.bias_update_until * total else 0.0
