"""A lower bound on the memory a training run needs, checked before it starts.

An impossible batch (say `data.batch_size=100000`) would otherwise die in the allocator part-way
into the first step, or get the process killed by the system. The bound counts only what cannot
be avoided: float32 weights and gradients and the two AdamW moments (16 bytes per parameter, 12 with
bf16 moments), and per token of a micro-batch the float32 residual stream entering and leaving
attention in every layer (kept for the backward pass). Real runs need more; whatever the bound lets
through and still does not fit is reported by `allocation_error` when the allocator fails.
"""

from __future__ import annotations

import os

import torch

from ..config import ModelConfig

GB = 1e9


class TrainingMemoryError(MemoryError):
    """The run cannot fit in the device's memory; the message says what to change."""


def training_bytes_lower_bound(config: ModelConfig, n_params: int, tokens_per_micro_batch: int,
                               moment_bytes: int = 4) -> tuple[int, int]:
    """(bytes for weights + gradients + AdamW states, bytes of activations of one micro-batch);
    `moment_bytes` per element of each AdamW moment (4 for float32, 2 for bf16)."""
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    states = (8 + 2 * moment_bytes) * n_params
    activations = tokens_per_micro_batch * (layers * 2 * 4 * config.hidden_size + 16)  # + int64 inputs, targets
    return states, activations


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of `device` (physical RAM for the CPU), or None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(config: ModelConfig, n_params: int, batch_size: int, seq_len: int, device: torch.device,
               moment_bytes: int = 4) -> None:
    """TrainingMemoryError when the lower bound exceeds the device's total memory."""
    total = device_memory_bytes(device)
    states, activations = training_bytes_lower_bound(config, n_params, batch_size * seq_len, moment_bytes)
    if total is not None and states + activations > total:
        raise TrainingMemoryError(
            f"this run cannot fit in memory: it needs at least {(states + activations) / GB:.1f} GB "
            f"({states / GB:.2f} GB of weights, gradients and AdamW states; {activations / GB:.1f} GB of "
            f"activations for a micro-batch of data.batch_size={batch_size} x data.seq_len={seq_len}), but "
            f"the {device.type} device has {total / GB:.1f} GB; lower data.batch_size (raise data.grad_accum "
            "to keep the tokens per step)")


def allocation_error(
    exc: BaseException, batch_size: int, seq_len: int, device: torch.device
) -> TrainingMemoryError | None:
    """The error to report for an allocator failure (CPU or CUDA) during a step; None for other errors."""
    message = str(exc)
    if not isinstance(exc, torch.OutOfMemoryError) and not (
        isinstance(exc, RuntimeError) and ("can't allocate memory" in message or "out of memory" in message.lower())
    ):
        return None
    first = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    return TrainingMemoryError(
        f"out of memory on the {device.type} device with micro-batches of data.batch_size={batch_size} x "
        f"data.seq_len={seq_len} ({first}); lower data.batch_size (raise data.grad_accum to keep the tokens "
        "per step)")
