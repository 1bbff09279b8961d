"""Continuous batching: which sequences run in the next step, and how many tokens each processes.

Every step, sequences that finished have already left; waiting sequences join while there is a free
row (`max_batch`) and room in the cache for their prompt. Running sequences in decode process one
token each; sequences still reading their prompt get chunks of it from what is left of the step's
token budget (`token_budget`), oldest first, so one long prompt never stalls the decodes.

When the cache runs out of blocks for a running sequence, the most recently admitted other sequence
is preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
(prompt and generated tokens) when room returns. Its sampling is keyed by output position, so the
tokens it goes on to produce are the same.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..inference.detokenize import IncrementalDetokenizer
from .paged_cache import BlockPool
from .sampling import RequestSampling


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One choice of one request: its tokens, cache blocks and output state."""

    seq_id: int
    request: Any  # the owning RequestHandle
    choice: int
    prompt: list[int]
    sampling: RequestSampling
    seed: int
    detokenizer: IncrementalDetokenizer
    stop_ids: frozenset[int]
    max_tokens: int
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose latents are in the cache
    row: int = -1  # row of the engine's per-sequence tables while running
    status: Status = Status.WAITING
    arrival: float = field(default_factory=time.perf_counter)
    last_token_time: float | None = None
    preemptions: int = 0
    # MTP speculation: positions the MTP module's cache holds, and its inputs still to run (the main
    # model's hidden state at the next positions [q, hidden] and the token that follows each)
    mtp_computed: int = 0
    mtp_hidden: Any = None
    mtp_ids: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output if self.output else self.prompt

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def pending(self) -> int:
        """Tokens to run through the model before the next token can be sampled."""
        return self.length - self.computed


@dataclass
class StepPlan:
    decodes: list[Sequence]  # one new token each
    prefills: list[tuple[Sequence, int]]  # (sequence, tokens of its prompt processed this step)
    preempted: list[Sequence]

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, pool: BlockPool, max_batch: int, token_budget: int, max_queue: int,
                 lookahead: int = 0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if token_budget <= max_batch:
            raise ValueError(f"token_budget ({token_budget}) must exceed max_batch ({max_batch}): "
                             "the decodes of a full batch must leave room for prompt chunks")
        self.pool, self.max_batch, self.token_budget, self.max_queue = pool, max_batch, token_budget, max_queue
        self.lookahead = lookahead  # extra slots a decode may write (a drafted token being verified)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free_rows = list(range(max_batch - 1, -1, -1))

    @property
    def queue_full(self) -> bool:
        return len(self.waiting) >= self.max_queue

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out (finished, cancelled or failed) and return its blocks and row."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self._free_rows.append(seq.row)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks, seq.row, seq.status = [], -1, Status.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free_rows.append(seq.row)
        self.pool.release(seq.blocks)
        seq.blocks, seq.row, seq.computed, seq.status = [], -1, 0, Status.WAITING
        seq.mtp_computed, seq.mtp_hidden, seq.mtp_ids = 0, None, []
        seq.preemptions += 1
        self.waiting.appendleft(seq)

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Give `seq` blocks for `tokens` tokens; False when the pool is short."""
        need = self.pool.blocks_for(tokens) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.pool.free_blocks:
            return False
        seq.blocks += self.pool.allocate(need)
        return True

    def schedule(self) -> tuple[StepPlan, list[Sequence]]:
        """Plan the next step. Also returns the sequences admitted in it (they need their row state set)."""
        preempted: list[Sequence] = []
        # decodes first: each needs room for one more token, preempting the youngest others if it must
        decodes: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.pending != 1:
                continue
            while not self._grow(seq, seq.computed + 1 + self.lookahead):
                victim = next((s for s in reversed(self.running) if s is not seq), None)
                if victim is None:
                    raise RuntimeError("cache too small for a single sequence")  # validated at submit
                self._preempt(victim)
                preempted.append(victim)
                if victim in decodes:
                    decodes.remove(victim)
            decodes.append(seq)
        admitted: list[Sequence] = []
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            # admit only with room for the whole prompt, so admissions never preempt
            if self.pool.blocks_for(seq.length) > self.pool.free_blocks:
                break
            self.waiting.popleft()
            self._grow(seq, seq.length)
            seq.status, seq.row = Status.RUNNING, self._free_rows.pop()
            self.running.append(seq)
            admitted.append(seq)
            if seq.pending == 1:
                decodes.append(seq)
        budget = self.token_budget - len(decodes)
        prefills: list[tuple[Sequence, int]] = []
        for seq in self.running:
            if seq.pending <= 1 or budget <= 0:
                continue  # decoding (or admitted with a one-token prompt: it decodes next step)
            chunk = min(seq.pending, budget)  # its blocks were allocated at admission
            prefills.append((seq, chunk))
            budget -= chunk
        return StepPlan(decodes, prefills, preempted), admitted
