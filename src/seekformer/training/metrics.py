"""Training metrics: the `metrics.jsonl` log, the statistics of a logging interval, expert-load meters.

Each line of `metrics.jsonl` is one JSON object with `kind` "train" (every `log_every` steps: means
over the interval) or "val" (every `eval_every` steps), plus `step` and `tokens` (tokens trained on
so far). See docs/training.md for the fields.

Statistics stay on the device until they are logged: reading a value on the host (`.item()`,
`float(t)`) waits for every queued kernel, so doing it each micro-step would stall a GPU on
every step (as nanoGPT does, values cross to the host only at log steps).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..io_utils import atomic_write_text
from .balance import load_violation

METRICS_FILE = "metrics.jsonl"


class MetricsError(ValueError):
    """A metrics.jsonl line that is not a JSON object (other than a half-written last line)."""


class MetricsLog:
    """Append-only JSONL log, flushed after every record."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_FILE

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after `step` (written by a run killed after its last checkpoint)
        and any partially written last line, so a resumed run continues the log seamlessly."""
        keep = [json.dumps(r) for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a run directory or the file). A half-written last line (left by
    a run killed while logging) is skipped; any other line that is not a JSON object is a MetricsError
    naming the file and the line."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise MetricsError(f"{path} is not a metrics log: not UTF-8 text ({exc})") from None
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and records:
                break  # the half-written last line of a killed run
            raise MetricsError(f"{path}, line {number} is not JSON ({exc.msg}): {line[:80]!r}") from None
        if not isinstance(record, dict):
            raise MetricsError(f"{path}, line {number} is not a JSON object: {line[:80]!r}")
        records.append(record)
    return records


class Interval:
    """What the train record of a logging interval summarises: per-step scalar metrics (summed on the
    device), expert loads, tokens, and the training time, from which the pauses for evaluations and
    saves are excluded (the record's tokens/s and MFU are training throughput)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.loads = LoadMeter()
        self.steps = self.tokens = 0
        self.start, self.paused_seconds = time.perf_counter(), 0.0

    def add(self, scalars: dict[str, torch.Tensor | float], loads: dict[str, torch.Tensor], tokens: int) -> None:
        for key, value in scalars.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.loads.add(loads)
        self.steps += 1
        self.tokens += tokens

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count as training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_seconds += time.perf_counter() - start

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused_seconds

    def means(self) -> dict[str, float]:
        """Mean of each scalar over the interval's steps (one host transfer for all of them)."""
        keys = [k for k, v in self.sums.items() if isinstance(v, torch.Tensor)]
        values = dict(zip(keys, to_host([self.sums[k] for k in keys])))
        return {k: (values[k] if k in values else float(v)) / self.steps for k, v in self.sums.items()}


def to_host(tensors: list[torch.Tensor]) -> list[float]:
    """Scalar tensors as floats, with one device-to-host copy for all of them."""
    if not tensors:
        return []
    return torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist()


class LoadMeter:
    """Expert loads of each MoE layer over a logging interval: summed counts and the mean of the
    per-step MaxVio (MaxVio_batch of the loss-free balancing paper, a step's batch being all its
    micro-batches). Both stay on the device until `summary`."""

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        self.maxvio: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, loads: dict[str, torch.Tensor]) -> None:
        for name, counts in loads.items():
            counts = counts.detach().long()
            self.counts[name] = self.counts[name] + counts if name in self.counts else counts
            vio = load_violation(counts)
            self.maxvio[name] = self.maxvio[name] + vio if name in self.maxvio else vio
        self.steps += 1

    def summary(self) -> dict[str, Any]:
        """{"maxvio": {layer: mean MaxVio}, "maxvio_mean": float, "expert_load": {layer: [c_i / mean c]}}."""
        if not self.counts:  # no steps yet, or a model without MoE layers
            return {}
        names = list(self.counts)
        host = to_host([self.maxvio[name] for name in names])
        maxvio = {name: round(v / self.steps, 5) for name, v in zip(names, host)}
        loads = {}
        for name in names:
            counts = self.counts[name].float()
            loads[name] = [round(c, 4) for c in (counts / counts.mean().clamp(min=1e-9)).tolist()]
        return {"maxvio": maxvio, "maxvio_mean": round(sum(maxvio.values()) / len(maxvio), 5),
                "expert_load": loads}
