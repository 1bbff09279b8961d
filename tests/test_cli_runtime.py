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


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: there is no thread count to choose")
def test_busy_cores_mean_one_thread():
    """With every core kept busy by other processes, several threads wait for each other at every
    operation: the probe must choose one thread, and `seekformer generate` (through set_cpu_threads)
    uses it."""
    cores = os.cpu_count()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    threads = torch.get_num_threads()
    try:
        time.sleep(0.3)
        assert pick_cpu_threads(cores) == 1
        torch.set_num_threads(cores)
        said = []
        assert set_cpu_threads(0, said.append) == 1 and torch.get_num_threads() == 1
        assert said == [f"using 1 CPU thread(s) instead of {cores} (the cores are busy with other processes)"]
        assert set_cpu_threads(cores, said.append) == cores  # an explicit count is kept as given
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
        torch.set_num_threads(threads)
