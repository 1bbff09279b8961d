"""GRPO (DeepSeekMath, R1): group-relative policy optimisation with rule-based rewards."""

from __future__ import annotations

from .grpo_loss import LOSS_TYPES, SCALES, group_advantages, grpo_loss, grpo_loss_stats, per_token_kl

__all__ = ["LOSS_TYPES", "SCALES", "group_advantages", "grpo_loss", "grpo_loss_stats", "per_token_kl"]
