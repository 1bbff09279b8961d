"""What the one-process SFT and GRPO trainers do where a data-parallel run differs.

`SFTTrainer` and `GRPOTrainer` inherit these; `seekformer.distributed.post_training.DataParallel`,
placed before them in a distributed trainer's bases, overrides each one.
"""

from __future__ import annotations

import time

import torch

from ..model.transformer import Transformer
from .optim import clip_grad_norm


class OneProcessHooks:
    """The one-process side of the hooks; the trainer provides `self.model`."""

    model: Transformer

    def parallelize(self, model: Transformer) -> Transformer:
        """Where a data-parallel trainer shards the loaded policy (one process: as loaded)."""
        return model

    def reduce_sums(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-rank sums (losses, token counts, expert loads) summed over all ranks (one process: its own)."""
        return values

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm to `max_norm`; return the norm before clipping."""
        return clip_grad_norm(self.model.parameters(), max_norm)

    def out_of_time(self, deadline: float) -> bool:
        """Whether `run.max_minutes` is spent (data parallel: on any rank, so that all stop together)."""
        return time.perf_counter() >= deadline
