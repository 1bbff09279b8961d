"""Where a command runs: the device it names and the number of CPU threads.

Shared by training, `seekformer generate` and the server: each resolves its `--device` with
`resolve_device` and sets its CPU threads with `set_cpu_threads`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

DEVICE_KINDS = ("cpu", "cuda")


class DeviceError(ValueError):
    """A device name that is not a device, or a device this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when available, else the CPU), `cpu`, `cuda` or `cuda:N`, checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in DEVICE_KINDS:
        raise DeviceError(f"device {name!r} is not supported: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
            raise DeviceError(f"device {name!r} asked for, but no CUDA device is available ({why})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s) (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device


def pick_cpu_threads(default: int) -> int:
    """`default` threads, or 1 when other processes keep the cores busy.

    With fewer free cores than threads, every parallel operation waits for a descheduled thread at
    its barrier: small operations become tens of times slower than on one thread (measured here:
    6 ms instead of 30 us per linear layer; decoding a tiny model ran at 1.3 tokens/s on 2 threads
    against 146 on one while another process was busy). A quiet machine runs a chain of small
    operations about as fast on `default` threads as on one; a loaded one runs it several times
    slower. Draws its inputs from its own generator: the global RNG is left untouched.
    """
    if default <= 1:
        return default
    gen = torch.Generator().manual_seed(0)
    x0, w = torch.randn(256, 128, generator=gen), torch.randn(128, 128, generator=gen) * 0.05

    def chain_seconds(threads: int) -> float:
        torch.set_num_threads(threads)
        times = []
        for _ in range(5):
            x, start = x0, time.perf_counter()
            for _ in range(10):
                x = F.silu(F.linear(x, w)) + x
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    previous = torch.get_num_threads()
    try:
        one, many = chain_seconds(1), chain_seconds(default)
    finally:
        torch.set_num_threads(previous)
    return 1 if many > 2 * one else default


def set_cpu_threads(requested: int | None, echo: Callable[[str], None] | None = None) -> int:
    """Use `requested` CPU threads, or (None or 0) torch's default unless the cores are busy with other
    processes, then 1 (see `pick_cpu_threads`). Says what changed through `echo`; returns the count."""
    if requested is not None and requested < 0:
        raise ValueError(f"the number of CPU threads must be >= 0 (0 = automatic), got {requested}")
    current = torch.get_num_threads()
    threads = requested or pick_cpu_threads(current)
    if threads != current:
        if echo is not None:
            reason = "" if requested else " (the cores are busy with other processes)"
            echo(f"using {threads} CPU thread(s) instead of {current}{reason}")
        torch.set_num_threads(threads)
    return threads
