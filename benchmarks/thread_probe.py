"""The busy-core probe (`seekformer.runtime.pick_cpu_threads`) against the median rule it replaced.

    python benchmarks/thread_probe.py [--busy 2 --busy-threads 2 --trials 5]

Starts `--busy` processes that each run a `--busy-threads`-thread PyTorch loop forever (the load of
tests/test_cli_runtime.py), then, in one process and interleaved, per trial:
- the median rule (the probe before): chains of 10 small linear layers, the median of 5 chains on
  one thread and on all threads, 1 thread when the second median is more than twice the first;
  printed with the ratio of the same chains' total times, which is what a command would see;
- `pick_cpu_threads`, with its wall time.
With `--busy 0` it measures the machine as it is (quiet or not).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from common import machine

from seekformer.runtime import busy_cores, pick_cpu_threads


def median_rule(default: int) -> tuple[int, float, float]:
    """(choice, median ratio, total ratio) of the probe as it was before."""
    gen = torch.Generator().manual_seed(0)
    x0, w = torch.randn(256, 128, generator=gen), torch.randn(128, 128, generator=gen) * 0.05

    def chains(threads: int) -> list[float]:
        torch.set_num_threads(threads)
        times = []
        for _ in range(5):
            x, start = x0, time.perf_counter()
            for _ in range(10):
                x = F.silu(F.linear(x, w)) + x
            times.append(time.perf_counter() - start)
        return times

    one, many = chains(1), chains(default)
    torch.set_num_threads(default)
    ratio = statistics.median(many) / statistics.median(one)
    return (1 if ratio > 2 else default), ratio, sum(many) / sum(one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=os.cpu_count())
    parser.add_argument("--busy-threads", type=int, default=os.cpu_count())
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"{machine()}; {args.busy} busy process(es) of {args.busy_threads} thread(s)")
    with busy_cores(args.busy, args.busy_threads):
        print("trial  load1  median-rule  median-ratio  total-ratio  rule-s  probe  probe-s")
        for trial in range(args.trials):
            start = time.perf_counter()
            old, median_ratio, total_ratio = median_rule(cores)
            old_s = time.perf_counter() - start
            start = time.perf_counter()
            new = pick_cpu_threads(cores)
            new_s = time.perf_counter() - start
            print(f"{trial:5d}  {os.getloadavg()[0]:5.1f}  {old:11d}  {median_ratio:12.2f}  {total_ratio:11.2f}  "
                  f"{old_s:6.2f}  {new:5d}  {new_s:7.3f}", flush=True)


if __name__ == "__main__":
    main()
