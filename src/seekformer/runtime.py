"""Where a command runs: the device it names and the number of CPU threads.

Shared by training, `seekformer generate` and the server: each resolves its `--device` with
`resolve_device` and sets its CPU threads with `set_cpu_threads`.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

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


# the probe: up to ROUNDS rounds of one WINDOW_S window per thread count; after two rounds (one in each order)
# it stops at a slowdown above DECISIVE or once BUDGET_S is spent (busy cores stretch a window by a thread's wait)
PROBE_ROUNDS, PROBE_WINDOW_S, PROBE_DECISIVE, PROBE_BUDGET_S = 4, 0.012, 8.0, 0.2


def slowdown(one: list[tuple[float, int]], many: list[tuple[float, int]]) -> float:
    """Seconds per operation on several threads over seconds per operation on one, from windows of
    (seconds, operations). Totals, not medians: on busy cores most operations run at full speed and a
    few wait tens of milliseconds for a descheduled thread, and those waits are the cost being measured
    (a median of short timings discards them and reports busy cores as free)."""
    per_op = [sum(t for t, _ in windows) / sum(n for _, n in windows) for windows in (one, many)]
    return per_op[1] / per_op[0]


def pick_cpu_threads(default: int) -> int:
    """`default` threads, or 1 when other processes keep the cores busy.

    With fewer free cores than threads, every parallel operation waits for a descheduled thread at
    its barrier: small operations become tens of times slower than on one thread (measured here:
    6 ms instead of 30 us per linear layer; decoding a tiny model ran at 1.3 tokens/s on 2 threads
    against 146 on one while another process was busy). A quiet machine runs small operations about
    as fast on `default` threads as on one (0.7-1x the time); a loaded one several times slower.

    Times windows of small linear layers, alternating one and `default` threads so that both see the
    same load, and compares the throughputs (see `slowdown`): about 0.1 s on a quiet machine, 0.05-0.3 s
    on busy cores. Draws its inputs from its own generator: the global RNG is left untouched.
    """
    if default <= 1:
        return default
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(256, 128, generator=gen), torch.randn(128, 128, generator=gen)

    def window(threads: int) -> tuple[float, int]:
        torch.set_num_threads(threads)
        ops, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < PROBE_WINDOW_S:
            F.silu(F.linear(x, w))
            ops += 1
        return elapsed, ops

    previous, start = torch.get_num_threads(), time.perf_counter()
    one: list[tuple[float, int]] = []
    many: list[tuple[float, int]] = []
    try:
        torch.set_num_threads(1)  # warm up on one thread (on busy cores, one operation on more can wait 0.1 s)
        F.silu(F.linear(x, w))
        for turn in range(PROBE_ROUNDS):
            first, second = (one, 1), (many, default)
            for windows, threads in (first, second) if turn % 2 == 0 else (second, first):
                windows.append(window(threads))
            if turn and (slowdown(one, many) > PROBE_DECISIVE or time.perf_counter() - start > PROBE_BUDGET_S):
                break
    finally:
        torch.set_num_threads(previous)
    return 1 if slowdown(one, many) > 2 else default


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


_SPIN = """
import torch
torch.set_num_threads({threads})
x, w = torch.randn(256, 128), torch.randn(128, 128) * 0.05
print("busy", flush=True)
while True:
    x = torch.nn.functional.silu(x @ w) + x
    x = x / x.norm()
"""


@contextlib.contextmanager
def busy_cores(processes: int, threads: int) -> Iterator[None]:
    """Other processes keeping the CPU busy while the block runs, each a `threads`-thread PyTorch loop:
    the load `pick_cpu_threads` is there to detect (its test and `benchmarks/thread_probe.py`)."""
    spinning = [subprocess.Popen([sys.executable, "-c", _SPIN.format(threads=threads)], stdout=subprocess.PIPE,
                                 text=True) for _ in range(processes)]
    try:
        for proc in spinning:  # importing torch can take seconds on a loaded machine: wait until each one spins
            if proc.stdout.readline() != "busy\n":
                raise RuntimeError("a busy-loop process did not start")
        time.sleep(0.5)
        yield
    finally:
        for proc in spinning:
            proc.kill()
            proc.wait()
