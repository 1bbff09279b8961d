"""Probes of the machine a run starts on: the matmul peak (the MFU denominator) and the CPU thread count."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.2, size: int = 1024) -> float:
    """FLOP/s of square matmuls in `dtype` on `device`, timed for about `seconds`: the MFU denominator
    (the machine's achievable peak, not its data-sheet one)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    _sync(device)
    a @ b  # warm up (kernel selection, AMX tile configuration)
    _sync(device)
    runs, start = 0, time.perf_counter()
    while True:
        a @ b
        runs += 1
        if runs % 4 == 0:
            _sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return 2 * size**3 * runs / elapsed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_cpu_threads(default: int) -> int:
    """`default` threads, or 1 when other processes keep the cores busy.

    With fewer free cores than threads, every parallel operation waits for a descheduled thread at
    its barrier: small operations become tens of times slower than on one thread (measured here:
    6 ms instead of 30 us per linear layer). A quiet machine runs a chain of small operations
    about as fast on `default` threads as on one; a loaded one runs it several times slower.
    """
    if default <= 1:
        return default

    def chain_seconds(threads: int) -> float:
        torch.set_num_threads(threads)
        x, w = torch.randn(256, 128), torch.randn(128, 128) * 0.05
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(10):
                x = F.silu(F.linear(x, w)) + x
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    try:
        one, many = chain_seconds(1), chain_seconds(default)
    finally:
        torch.set_num_threads(default)
    return 1 if many > 2 * one else default
