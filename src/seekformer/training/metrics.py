"""Training metrics: the `metrics.jsonl` log and expert-load meters.

Each line of `metrics.jsonl` is one JSON object with `kind` "train" (every `log_every` steps: means
over the interval) or "val" (every `eval_every` steps), plus `step` and `tokens` (tokens trained on
so far). See docs/training.md for the fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..io_utils import atomic_write_text
from .balance import max_violation

METRICS_FILE = "metrics.jsonl"


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
    """The records of a metrics.jsonl (a run directory or the file); unparsable lines are skipped
    (the last line of a killed run can be half written)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class LoadMeter:
    """Expert loads of each MoE layer over a logging interval: summed counts and the mean of the
    per-step MaxVio (MaxVio_batch of the loss-free balancing paper, a step's batch being all its
    micro-batches)."""

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        self.maxvio: dict[str, float] = {}
        self.steps = 0

    def add(self, loads: dict[str, torch.Tensor]) -> None:
        for name, counts in loads.items():
            counts = counts.detach().cpu().long()
            self.counts[name] = self.counts[name] + counts if name in self.counts else counts
            self.maxvio[name] = self.maxvio.get(name, 0.0) + max_violation(counts)
        self.steps += 1

    def summary(self) -> dict[str, Any]:
        """{"maxvio": {layer: mean MaxVio}, "maxvio_mean": float, "expert_load": {layer: [c_i / mean c]}}."""
        if not self.steps:
            return {}
        maxvio = {name: round(v / self.steps, 5) for name, v in self.maxvio.items()}
        loads = {}
        for name, counts in self.counts.items():
            mean = counts.float().mean().clamp(min=1e-9)
            loads[name] = [round(float(c), 4) for c in counts.float() / mean]
        return {"maxvio": maxvio, "maxvio_mean": round(sum(maxvio.values()) / len(maxvio), 5),
                "expert_load": loads}

    def reset(self) -> None:
        self.__init__()
