"""Activation checkpointing, applied to a built model: each decoder and MTP block keeps only its inputs
during the forward and recomputes its activations when the backward reaches it.

Memory falls from every block's saved activations to one block's plus the block inputs, at the cost of a
second forward of each block (measured in docs/training.md). The numerics are unchanged: the recomputed
forward is the same computation on the same inputs. The routing statistics a block returns come from
its first forward only (the recomputation's outputs are discarded), so the expert loads are counted
once. Dropout draws the same mask again (the RNG state is restored for the recomputation).

Applied before any sharding (`DistributedTrainer.parallelize`), as torchtitan orders them: FSDP2's
hooks then wrap the checkpointed forward and gather the block's parameters for the recomputation too.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation, generation: nothing would be saved anyway
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> list[nn.Module]:
    """Checkpoint every block of `model` (its decoder layers and MTP modules) in place; returns them.
    Parameter names, the state dict and the modules' types are unchanged."""
    blocks = [*model.model.layers, *model.mtp]
    for block in blocks:
        if "forward" in vars(block):
            raise ValueError(f"activation checkpointing is already applied to block {block.layer_idx}")
        block.forward = partial(_checkpointed, block.forward)
    return blocks
