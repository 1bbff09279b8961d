"""seekformer.runtime: device names and the CPU thread count shared by training and inference."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from seekformer.runtime import DeviceError, pick_cpu_threads, resolve_device, set_cpu_threads
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


BUSY = """
import torch
torch.set_num_threads({threads})
x, w = torch.randn(256, 128), torch.randn(128, 128) * 0.05
while True:
    x = torch.nn.functional.silu(x @ w) + x
    x = x / x.norm()
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: there is no thread count to choose")
def test_busy_cores_mean_one_thread():
    """With every core kept busy by other processes (one multi-threaded PyTorch loop per core, the case
    measured in issue 10), several threads wait for each other at every operation: the probe chooses one
    thread, and `set_cpu_threads(0)` (what `seekformer generate` and the trainer call) applies it. The
    probe is a timing: on a machine that other work also loads it is given three tries."""
    cores = os.cpu_count()
    busy = [subprocess.Popen([sys.executable, "-c", BUSY.format(threads=cores)]) for _ in range(cores)]
    threads = torch.get_num_threads()
    try:
        time.sleep(2.0)  # the busy processes import torch
        assert 1 in [pick_cpu_threads(cores) for _ in range(3)]
        said = []
        for _ in range(3):
            torch.set_num_threads(cores)
            if set_cpu_threads(0, said.append) == 1:
                break
        assert torch.get_num_threads() == 1
        assert said[-1] == f"using 1 CPU thread(s) instead of {cores} (the cores are busy with other processes)"
        assert set_cpu_threads(cores) == cores  # an explicit count is kept as given
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
        torch.set_num_threads(threads)
