"""seekformer.runtime: device names and the CPU thread count shared by training and inference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seekformer.runtime import (
    DeviceError,
    busy_cores,
    pick_cpu_threads,
    resolve_device,
    set_cpu_threads,
    slowdown,
)
from seekformer.training.machine import measure_matmul_peak


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("banana", "mps", "cuda:x", ""):
        with pytest.raises(DeviceError, match="expected auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    with pytest.raises(DeviceError, match="cuda:99"):
        resolve_device("cuda:99")


def test_probes_leave_the_global_rng_alone():
    state = torch.get_rng_state()
    measure_matmul_peak(torch.device("cpu"), torch.float32, seconds=0.01, size=64)
    pick_cpu_threads(2)
    assert torch.equal(torch.get_rng_state(), state)


def test_slowdown_counts_the_waits():
    """Measured on this 2-core machine with both cores busy (chains of 10 linear layers, ms): most chains
    ran at full speed on 2 threads and one waited 0.7 s for a descheduled thread. The medians
    (1.28 ms on 2 threads, 2.8 on one) said 2 threads were faster; per operation over all the time
    spent, they were 12 times slower, and that is what a command running on them would see."""
    one = [(ms / 1000, 10) for ms in (2.8, 29.57, 1.23, 26.91, 1.17)]
    many = [(ms / 1000, 10) for ms in (729.8, 1.28, 1.23, 1.1, 33.46)]
    assert slowdown(one, many) == pytest.approx(766.87 / 61.68)
    # windows of unequal operation counts: seconds per operation (12 ms for 33 against 61.5 ms for one)
    assert slowdown([(0.012, 33)], [(0.0615, 1)]) == pytest.approx(0.0615 * 33 / 0.012)
    # a quiet machine (measured): 2 threads a little faster than one
    assert slowdown([(0.00115, 10)] * 5, [(0.00083, 10)] * 5) == pytest.approx(0.83 / 1.15)


SRC = str(Path(__file__).resolve().parents[1] / "src")
PROBE = """
import time
import torch
from seekformer.runtime import pick_cpu_threads
threads = torch.get_num_threads()
for _ in range(5):
    start = time.perf_counter()
    pick = pick_cpu_threads({cores})
    print(pick, time.perf_counter() - start)
assert torch.get_num_threads() == threads  # the probe restores the count it found
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: there is no thread count to choose")
def test_busy_cores_mean_one_thread():
    """With every core kept busy by other processes (one multi-threaded PyTorch loop per core, the case
    measured in issue 10), several threads wait for each other at every operation and the probe chooses
    one thread, in a fraction of a second (the probe timed medians of 1 ms chains before: it often
    chose 2 threads here, and took seconds). The probe is a timing: of five tries, most must choose one."""
    cores = os.cpu_count()
    threads = torch.get_num_threads()
    try:
        with busy_cores(cores, cores):
            # the probe runs in a fresh process, as in `seekformer generate` (this one has run the suite so far)
            out = subprocess.run([sys.executable, "-c", PROBE.format(cores=cores)], capture_output=True, text=True,
                                 timeout=120, check=True, env={**os.environ, "PYTHONPATH": SRC}).stdout.splitlines()
        picks, seconds = [int(line.split()[0]) for line in out], [float(line.split()[1]) for line in out]
        assert picks.count(1) >= 3, out
        assert sum(seconds) < 10, out  # an operation can wait ~1 s here; the median probe took up to 10 s a try
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(threads)


def test_automatic_threads_apply_the_probe(monkeypatch):
    """`set_cpu_threads(0)` (what `seekformer generate`, the trainer and the server call) applies the
    probe's choice and says why; an explicit count is kept as given, without probing."""
    import seekformer.runtime as runtime

    threads = torch.get_num_threads()
    probed = []
    monkeypatch.setattr(runtime, "pick_cpu_threads", lambda default: probed.append(default) or 1)
    try:
        torch.set_num_threads(2)
        said = []
        assert set_cpu_threads(0, said.append) == 1
        assert torch.get_num_threads() == 1 and probed == [2]
        assert said == ["using 1 CPU thread(s) instead of 2 (the cores are busy with other processes)"]
        assert set_cpu_threads(2, said.append) == 2 and probed == [2]
        assert torch.get_num_threads() == 2 and said[-1] == "using 2 CPU thread(s) instead of 1"
    finally:
        torch.set_num_threads(threads)
