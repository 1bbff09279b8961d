"""Engine metrics in the Prometheus text exposition format (version 0.0.4).

The engine thread records; the HTTP thread renders. A lock keeps each rendering consistent.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RATE_WINDOW_S = 10.0
PREFIX = "seekformer"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            running += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out += [f"{name}_sum {self.total!r}", f"{name}_count {running}"]
        return out


class EngineMetrics:
    """Counters, gauges and latency histograms of one engine."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(TTFT_BUCKETS)
        self.finished: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.preemptions = 0
        self.steps = 0
        self.drafted = 0  # MTP speculation: drafted tokens, and those the model accepted
        self.accepted = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self.waiting = self.running = self.blocks_used = self.blocks_total = 0

    def record_step(self, new_tokens: int, waiting: int, running: int, blocks_used: int, blocks_total: int) -> None:
        now = time.perf_counter()
        with self.lock:
            self.steps += 1
            self.generation_tokens += new_tokens
            self._recent.append((now, new_tokens))
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
                self._recent.popleft()
            self.waiting, self.running = waiting, running
            self.blocks_used, self.blocks_total = blocks_used, blocks_total

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last RATE_WINDOW_S seconds."""
        now = time.perf_counter()
        recent = [n for t, n in self._recent if now - t <= RATE_WINDOW_S]
        return sum(recent) / RATE_WINDOW_S

    def render(self) -> str:
        p = PREFIX
        with self.lock:
            lines = [
                f"# HELP {p}_queue_length Requests' sequences waiting to start (or to resume after preemption).",
                f"# TYPE {p}_queue_length gauge", f"{p}_queue_length {self.waiting}",
                f"# HELP {p}_running_sequences Sequences in the running batch.",
                f"# TYPE {p}_running_sequences gauge", f"{p}_running_sequences {self.running}",
                f"# HELP {p}_cache_blocks_used Latent cache blocks held by sequences.",
                f"# TYPE {p}_cache_blocks_used gauge", f"{p}_cache_blocks_used {self.blocks_used}",
                f"# HELP {p}_cache_blocks_total Latent cache blocks in the pool.",
                f"# TYPE {p}_cache_blocks_total gauge", f"{p}_cache_blocks_total {self.blocks_total}",
                f"# HELP {p}_generation_tokens_per_second Tokens generated per second over the last "
                f"{RATE_WINDOW_S:g} s.",
                f"# TYPE {p}_generation_tokens_per_second gauge",
                f"{p}_generation_tokens_per_second {self.tokens_per_second()!r}",
                f"# HELP {p}_prompt_tokens_total Prompt tokens of accepted requests.",
                f"# TYPE {p}_prompt_tokens_total counter", f"{p}_prompt_tokens_total {self.prompt_tokens}",
                f"# HELP {p}_generation_tokens_total Tokens generated.",
                f"# TYPE {p}_generation_tokens_total counter",
                f"{p}_generation_tokens_total {self.generation_tokens}",
                f"# HELP {p}_preemptions_total Sequences preempted for lack of cache blocks (recomputed later).",
                f"# TYPE {p}_preemptions_total counter", f"{p}_preemptions_total {self.preemptions}",
                f"# HELP {p}_engine_steps_total Engine steps run.",
                f"# TYPE {p}_engine_steps_total counter", f"{p}_engine_steps_total {self.steps}",
                f"# HELP {p}_spec_draft_tokens_total Tokens drafted by MTP speculation.",
                f"# TYPE {p}_spec_draft_tokens_total counter", f"{p}_spec_draft_tokens_total {self.drafted}",
                f"# HELP {p}_spec_accepted_tokens_total Drafted tokens the model accepted.",
                f"# TYPE {p}_spec_accepted_tokens_total counter", f"{p}_spec_accepted_tokens_total {self.accepted}",
                f"# HELP {p}_sequences_finished_total Sequences finished, by reason.",
                f"# TYPE {p}_sequences_finished_total counter",
                *(f'{p}_sequences_finished_total{{reason="{reason}"}} {n}'
                  for reason, n in sorted(self.finished.items())),
                f"# HELP {p}_time_to_first_token_seconds Arrival to first generated token.",
                f"# TYPE {p}_time_to_first_token_seconds histogram",
                *self.ttft.lines(f"{p}_time_to_first_token_seconds"),
                f"# HELP {p}_inter_token_latency_seconds Time between consecutive tokens of a sequence.",
                f"# TYPE {p}_inter_token_latency_seconds histogram",
                *self.itl.lines(f"{p}_inter_token_latency_seconds"),
                f"# HELP {p}_request_latency_seconds Arrival to last token of a sequence.",
                f"# TYPE {p}_request_latency_seconds histogram",
                *self.e2e.lines(f"{p}_request_latency_seconds"),
            ]
        return "\n".join(lines) + "\n"
