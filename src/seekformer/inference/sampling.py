"""Sampling parameters and the next-token distribution they define.

The order is the usual one (and transformers'): temperature, then top-k, then top-p. Temperature 0
means greedy. Speculative decoding needs the distribution itself, not only a sample, so
`probabilities` returns it and `sample` draws from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None  # None or 0 = no limit
    top_p: float | None = None  # None or 1.0 = no limit

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if not isinstance(t, (int, float)) or math.isnan(t) or math.isinf(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"top_k must be a positive integer (or 0/None for no limit), got {k!r}")
        if p is not None and (not isinstance(p, (int, float)) or math.isnan(p) or not 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Next-token distribution [..., V] (float32) after temperature, top-k and top-p; not for greedy."""
    logits = logits.float()
    if params.temperature != 1:  # (dividing by 1 changes nothing)
        logits = logits / params.temperature
    vocab = logits.shape[-1]
    if params.top_k and params.top_k < vocab:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of probs [N, V] -> [N] (long)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy or sampled next token for each row of logits [N, V] -> [N]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return sample(probabilities(logits, params), generator)
