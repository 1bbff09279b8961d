"""GRPO's group-relative advantages and clipped policy loss (shared/reference/formulas.md, GRPO).

Shapes: B completions (prompts x group size G, each prompt's group contiguous), T = the padded
completion length; per-token tensors are [B, T], `mask` marks the completion's real tokens.

    A_i = (r_i - mean(r_group)) / (std + 1e-4)       std: the group's (Bessel), the batch's, or none
    rho = exp(logp - logp_old)
    l_t = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta * (exp(ref - logp) - (ref - logp) - 1)

aggregated over tokens as `grpo` (mean per sequence, then over sequences), `bnpo` (over the batch's
tokens), `dapo` (over the global batch's tokens: `normalizer` when the batch is split) or `dr_grpo`
(a constant B * T).
"""

from __future__ import annotations

import torch

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
STD_EPS = 1e-4  # added to the std before dividing, as TRL does


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Advantage of each of B = n_prompts * group_size completions [B]: reward minus its group's
    mean, divided by (std + 1e-4) with the group's unbiased std (`group`), the batch's (`batch`),
    or not divided (`none`, Dr. GRPO). A group of one has std 0 (advantage 0 under `group`)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a 1-D tensor [B], got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if rewards.numel() == 0 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not make whole groups of {group_size} "
                         "(an empty group, or a group missing completions)")
    rewards = rewards.float() if not rewards.is_floating_point() else rewards
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        std = std.expand_as(grouped).reshape(-1)
    else:
        std = rewards.std() if rewards.numel() > 1 else torch.zeros_like(rewards[0])
    return centred / (std + STD_EPS)


def _check(logprobs, old_logprobs, advantages, mask, ref_logprobs, beta, epsilon_low, epsilon_high, loss_type):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask), ("ref_logprobs", ref_logprobs)):
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, logprobs {tuple(logprobs.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logprobs.shape[0]}], got {tuple(advantages.shape)}")
    if beta < 0 or epsilon_low < 0 or epsilon_high < 0:
        raise ValueError(f"beta, epsilon_low and epsilon_high must be >= 0, got {beta}, {epsilon_low}, {epsilon_high}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the reference model's per-token log-probs)")


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "dapo",
    normalizer: float | None = None,
) -> torch.Tensor:
    """The GRPO loss (a scalar to minimise) of per-token log-probs [B, T] under the policy being
    trained (`logprobs`, with gradients), at rollout (`old_logprobs`) and under the reference model.

    `normalizer` replaces the denominator of `dapo` (the active tokens of the whole batch, when this
    call sees one micro-batch of it) and of `dr_grpo` (B * T: pass B * the maximum completion length
    when T is shorter). `grpo` and `bnpo` normalise within the call.
    """
    _check(logprobs, old_logprobs, advantages, mask, ref_logprobs, beta, epsilon_low, epsilon_high, loss_type)
    mask = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    if beta != 0:
        loss = loss + beta * per_token_kl(logprobs, ref_logprobs)
    masked = loss * mask
    if loss_type == "grpo":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return masked.sum() / (normalizer if normalizer is not None else mask.numel())
    return masked.sum() / (normalizer if normalizer is not None else mask.sum().clamp(min=1))


@torch.no_grad()
def grpo_loss_stats(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
) -> dict[str, float]:
    """Token means over the mask of what the loss did: `clip_low` (ratio below 1 - eps_low with a
    negative advantage: the clip stopped the update), `clip_high` (above 1 + eps_high, positive
    advantage), `clip_region` (either), and `kl` (k3, when ref_logprobs is given)."""
    mask = mask.bool()
    n = mask.sum().clamp(min=1)
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)
    low = (ratio < 1 - epsilon_low) & (adv < 0) & mask
    high = (ratio > 1 + epsilon_high) & (adv > 0) & mask
    out = {"clip_low": float(low.sum() / n), "clip_high": float(high.sum() / n),
           "clip_region": float((low | high).sum() / n)}
    if ref_logprobs is not None:
        out["kl"] = float((per_token_kl(logprobs, ref_logprobs) * mask).sum() / n)
    return out
