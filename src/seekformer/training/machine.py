"""The matmul peak of the machine a run starts on: the MFU denominator.

(The CPU thread count is chosen by `seekformer.runtime.set_cpu_threads`, shared with inference.)
"""

from __future__ import annotations

import time

import torch


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 0.2, size: int = 1024) -> float:
    """FLOP/s of square matmuls in `dtype` on `device`, timed for about `seconds`: the MFU denominator
    (the machine's achievable peak, not its data-sheet one). The operands come from a generator of
    their own, so the measurement leaves the global RNG (restored on resume) untouched."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
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
