"""The serving engine: one model, one paged latent cache, one scheduler, many concurrent requests.

    engine = Engine(model, tokenizer)
    for delta in engine.submit(prompt_ids, RequestSampling(max_tokens=32)):   # streams, offline
        print(delta.text, end="")
    outputs = engine.generate_batch([ids_a, ids_b], RequestSampling(temperature=0))

`engine.start()` runs the steps on a background thread (what the HTTP server does); without it,
iterating a request handle or calling `generate_batch` runs the steps in the caller's thread.

A step: the scheduler picks the decoding sequences (one token each) and chunks of waiting prompts
within a token budget; the decodes run as one forward pass over the batch, each prompt chunk as its
own; the last hidden state of every sequence that is ready for a token goes through the output
head and the per-row sampler at once. The sampled tokens are read back once per step (the only host
synchronisation), then each sequence's output is detokenised, checked for stops and streamed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..inference.detokenize import IncrementalDetokenizer
from .errors import QueueFull, RequestError
from .metrics import EngineMetrics
from .paged_cache import BlockPool, PagedStep
from .sampling import RequestSampling, SamplerInputs, sample
from .scheduler import Scheduler, Status
from .scheduler import Sequence as Seq
from .speculative import MTPSpeculator

log = logging.getLogger(__name__)

DEFAULT_CACHE_TOKENS = 65_536


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens and their log-probs, best first


@dataclass(frozen=True)
class Delta:
    """What one choice of a request gained in one step."""

    choice: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or "error" on the choice's last delta
    error: str | None = None


@dataclass
class ChoiceOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class RequestOutput:
    request_id: int
    prompt_tokens: int
    choices: list[ChoiceOutput]

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)


class RequestHandle:
    """A submitted request: iterate it (or `async for` it) for its `Delta`s, or call `result()`."""

    def __init__(self, engine: Engine, request_id: int, prompt: list[int], sampling: RequestSampling,
                 loop: asyncio.AbstractEventLoop | None) -> None:
        self.engine, self.request_id, self.prompt, self.sampling = engine, request_id, prompt, sampling
        self._loop = loop
        self._queue: queue.Queue | asyncio.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self._open = sampling.n  # choices not finished yet (as seen by the consumer)
        self.sequences: list[Seq] = []
        self.cancelled = False

    # called from the engine thread
    def _push(self, delta: Delta) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                pass
        else:
            self._queue.put(delta)

    @property
    def finished(self) -> bool:
        return self._open == 0

    def _account(self, delta: Delta) -> Delta:
        if delta.finish_reason is not None:
            self._open -= 1
        return delta

    def __iter__(self) -> Iterator[Delta]:
        if self._loop is not None:
            raise TypeError("this request was submitted with an event loop: use `async for`")
        while not self.finished:
            if not self.engine.running_in_background:
                while self._queue.empty():
                    if not self.engine.step() and not self.engine.has_work:
                        raise RuntimeError(f"request {self.request_id} has no work left in the engine")
            yield self._account(self._queue.get())

    def __aiter__(self):
        return self._aiterate()

    async def _aiterate(self):
        while not self.finished:
            yield self._account(await self._queue.get())

    def cancel(self) -> None:
        """Stop generating: the request's sequences and cache blocks are freed at the next step."""
        if not self.cancelled and not self.finished:
            self.cancelled = True
            self.engine._abort(self)

    def result(self) -> RequestOutput:
        """Wait for (or drive) the request to its end and gather its output."""
        choices = [ChoiceOutput(i, logprobs=[] if self.sampling.logprobs is not None else None)
                   for i in range(self.sampling.n)]
        for delta in self:
            collect(choices[delta.choice], delta)
        return RequestOutput(self.request_id, len(self.prompt), choices)


@dataclass
class _Verify:
    """The speculating rows of a decode forward: their index among the decodes, drafts [S], the main
    model's argmax after each draft [S], and the hidden states at [pending, draft] [S, 2, H]."""

    rows: list[int]
    drafts: torch.Tensor
    bonus: torch.Tensor
    hidden: torch.Tensor


def _padded_groups(chunks: list[tuple[Seq, int]], max_waste: float = 0.25) -> list[list[tuple[Seq, int]]]:
    """Prompt chunks grouped for padded forwards: longest first, a group closes when padding would
    exceed `max_waste` of its tokens."""
    groups: list[list[tuple[Seq, int]]] = []
    for item in sorted(chunks, key=lambda c: -c[1]):
        group = groups[-1] if groups else None
        if group is not None:
            width, real = group[0][1], sum(c for _, c in group) + item[1]
            if width * (len(group) + 1) <= real / (1 - max_waste):
                group.append(item)
                continue
        groups.append([item])
    return groups


def collect(choice: ChoiceOutput, delta: Delta) -> None:
    """Append a delta to the choice it belongs to."""
    choice.token_ids += delta.token_ids
    choice.text += delta.text
    if delta.logprobs is not None and choice.logprobs is not None:
        choice.logprobs += delta.logprobs
    if delta.finish_reason is not None:
        choice.finish_reason, choice.error = delta.finish_reason, delta.error


class Engine:
    """Continuous batching over a paged latent cache (see the module docstring).

    max_batch: most sequences decoding together. cache_tokens: size of the cache pool in tokens
    (all sequences together; default min(max_batch x context, 65,536)). token_budget: most tokens per
    step (decodes + prompt chunks). max_queue: most sequences waiting before `submit` raises `QueueFull`.
    """

    def __init__(self, model: torch.nn.Module, tokenizer=None, *, max_batch: int = 32, block_size: int = 16,
                 cache_tokens: int | None = None, token_budget: int | None = None, max_queue: int = 256,
                 attention_path: str = "auto", speculative: str | None = None) -> None:
        config = model.config
        if speculative not in (None, "mtp"):
            raise ValueError(f"unknown speculative method {speculative!r}; supported: 'mtp'")
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, config
        self.context = config.max_position_embeddings
        self.vocab_size = config.vocab_size
        if cache_tokens is None:
            cache_tokens = min(max_batch * self.context, max(DEFAULT_CACHE_TOKENS, self.context))
        if cache_tokens < block_size:
            raise ValueError(f"cache_tokens ({cache_tokens}) must hold at least one block of {block_size}")
        mtp_layers = [config.num_hidden_layers] if speculative else []
        self.pool = BlockPool(config, cache_tokens // block_size, block_size, model.dtype, model.device, mtp_layers)
        lookahead = 1 if speculative else 0
        self.capacity = self.pool.num_blocks * block_size - lookahead
        self.scheduler = Scheduler(self.pool, max_batch, token_budget or max(512, 4 * max_batch), max_queue,
                                   lookahead)
        self.attention_path = attention_path
        self.device = model.device
        self.speculator = MTPSpeculator(self) if speculative else None
        self.block_tables = torch.zeros(max_batch, self.pool.blocks_for(self.context) + 1, dtype=torch.long,
                                        device=self.device)
        self._table_len = [0] * max_batch  # blocks written into each row of block_tables
        self._counts: torch.Tensor | None = None  # [max_batch, V] generated-token counts (penalties)
        self._seen: torch.Tensor | None = None  # [max_batch, V] prompt or generated (repetition penalty)
        eos = config.eos_token_id
        self.eos_ids = frozenset(
            ([tokenizer.eos_id] if tokenizer is not None else [])
            + (eos if isinstance(eos, list) else [] if eos is None else [eos]))
        self.metrics = EngineMetrics()
        self._inbox: list[tuple[str, RequestHandle]] = []
        self._inbox_sequences = 0
        self._wake = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: Sequence[int], sampling: RequestSampling | None = None, *,
               loop: asyncio.AbstractEventLoop | None = None, ignore_queue_limit: bool = False) -> RequestHandle:
        """Queue a request (its prompt token ids); returns its handle. Raises `RequestError` for an invalid
        request and `QueueFull` when the queue is at its limit. Pass the event loop to `async for` it."""
        sampling = sampling or RequestSampling()
        prompt = self._check_prompt(prompt)
        if len(prompt) + sampling.max_tokens > self.context:
            raise RequestError("max_tokens", f"the prompt has {len(prompt)} tokens and max_tokens is "
                               f"{sampling.max_tokens}: together more than the model's context of {self.context}")
        if len(prompt) + sampling.max_tokens > self.capacity:
            raise RequestError("max_tokens", f"prompt ({len(prompt)}) + max_tokens ({sampling.max_tokens}) "
                               f"exceeds the engine's cache of {self.capacity} tokens")
        if any(t >= self.vocab_size for t in sampling.stop_token_ids):
            raise RequestError("stop_token_ids", f"token ids must be < vocab_size={self.vocab_size}")
        handle = RequestHandle(self, next(self._ids), prompt, sampling, loop)
        stop_ids = frozenset(sampling.stop_token_ids) | (frozenset() if sampling.ignore_eos else self.eos_ids)
        for choice in range(sampling.n):
            detok = IncrementalDetokenizer(self.tokenizer, sampling.skip_special_tokens, sampling.stop) \
                if self.tokenizer is not None else None
            if detok is None and sampling.stop:
                raise RequestError("stop", "stop strings need an engine with a tokenizer")
            handle.sequences.append(Seq(seq_id=handle.request_id * 1000 + choice, request=handle, choice=choice,
                                        prompt=prompt, sampling=sampling, seed=sampling.choice_seed(choice),
                                        detokenizer=detok, stop_ids=stop_ids, max_tokens=sampling.max_tokens))
        with self._wake:
            queued = len(self.scheduler.waiting) + self._inbox_sequences
            if not ignore_queue_limit and queued + sampling.n > self.scheduler.max_queue:
                raise QueueFull(f"the engine's queue is full ({queued} sequences waiting, limit "
                                f"{self.scheduler.max_queue}); retry later")
            self._inbox.append(("add", handle))
            self._inbox_sequences += sampling.n
            self._wake.notify()
        return handle

    def _check_prompt(self, prompt: Sequence[int]) -> list[int]:
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.flatten().tolist()
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise RequestError("prompt", "must be a list of token ids (encode text with the tokenizer first)")
        prompt = list(prompt)
        if not prompt:
            raise RequestError("prompt", "is empty: generation needs at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in prompt):
            raise RequestError("prompt", f"token ids must be integers in [0, {self.vocab_size})")
        if len(prompt) >= self.context:
            raise RequestError("prompt", f"has {len(prompt)} tokens; the model's context is {self.context}, "
                               "which leaves no room for a new token")
        return prompt

    def _abort(self, handle: RequestHandle) -> None:
        with self._wake:
            self._inbox.append(("abort", handle))
            self._wake.notify()

    def generate_batch(self, prompts: Sequence[Sequence[int]],
                       sampling: RequestSampling | Sequence[RequestSampling] | None = None) -> list[RequestOutput]:
        """Offline: run every prompt (with one sampling setting, or one per prompt) to its end."""
        if sampling is None or isinstance(sampling, RequestSampling):
            sampling = [sampling or RequestSampling()] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(sampling)} sampling settings")
        handles = [self.submit(p, s, ignore_queue_limit=True) for p, s in zip(prompts, sampling)]
        return [h.result() for h in handles]

    # ------------------------------------------------------------------ background thread
    @property
    def running_in_background(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running_in_background:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="seekformer-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._inbox or self.scheduler.running or self.scheduler.waiting):
                    self._wake.wait()
                if self._stopping:
                    return
            self.step()

    @property
    def has_work(self) -> bool:
        return bool(self._inbox or self.scheduler.running or self.scheduler.waiting)

    # ------------------------------------------------------------------ one step
    def step(self) -> bool:
        """Run one scheduling step; returns whether any sequence was processed. A failure inside the model
        ends the sequences of that step with an error (the engine and the other sequences go on)."""
        self._drain_inbox()
        plan, admitted = self.scheduler.schedule()
        self.metrics.preemptions += len(plan.preempted)
        for seq in admitted:
            self._admit(seq)
        if plan.empty:
            self._record(0)
            return False
        try:
            self._run(plan)
        except Exception as exc:  # noqa: BLE001 - reported to the requests of this step
            log.exception("engine step failed")
            for seq in [*plan.decodes, *(s for s, _ in plan.prefills)]:
                if seq.status is not Status.FINISHED:
                    self._end(seq, Delta(seq.choice, [], "", finish_reason="error",
                                         error=f"{type(exc).__name__}: {exc}"))
        return True

    def _drain_inbox(self) -> None:
        with self._wake:
            inbox, self._inbox, self._inbox_sequences = self._inbox, [], 0
        for action, handle in inbox:
            if action == "add":
                for seq in handle.sequences:
                    if not handle.cancelled:
                        self.scheduler.add(seq)
                self.metrics.prompt_tokens += len(handle.prompt) * handle.sampling.n
            else:  # abort
                for seq in handle.sequences:
                    if seq.status is not Status.FINISHED:
                        self._end(seq, Delta(seq.choice, [], "", finish_reason="abort"))

    def _admit(self, seq: Seq) -> None:
        """Set the row state of a sequence that joined the running batch."""
        if seq.sampling.uses_penalties:
            if self._counts is None:
                rows = self.scheduler.max_batch
                self._counts = torch.zeros(rows, self.vocab_size, dtype=torch.int32, device=self.device)
                self._seen = torch.zeros(rows, self.vocab_size, dtype=torch.bool, device=self.device)
            self._counts[seq.row].zero_()
            self._seen[seq.row].zero_()
            self._seen[seq.row, torch.tensor(seq.prompt, device=self.device)] = True
            if seq.output:  # a preempted sequence resuming
                out = torch.tensor(seq.output, device=self.device)
                self._counts[seq.row].index_add_(0, out, torch.ones_like(out, dtype=torch.int32))
                self._seen[seq.row, out] = True
        self._table_len[seq.row] = 0

    def _sync_table(self, seq: Seq) -> None:
        written = self._table_len[seq.row]
        if written != len(seq.blocks):
            new = seq.blocks[written:]
            self.block_tables[seq.row, written:len(seq.blocks)] = torch.tensor(new, dtype=torch.long)
            self._table_len[seq.row] = len(seq.blocks)

    @torch.inference_mode()
    def _run(self, plan) -> None:
        ready: list[Seq] = []  # sequences that get a token this step
        hidden: list[torch.Tensor] = []
        for seq in plan.decodes:
            self._sync_table(seq)
        for seq, _ in plan.prefills:
            self._sync_table(seq)
        verify = None
        if plan.decodes:
            h, verify = self._decode(plan.decodes)
            hidden.append(h)
            ready += plan.decodes
        for group in _padded_groups(plan.prefills):
            h, done = self._prefill(group)
            hidden.append(h)
            ready += done
        if ready:
            self._sample(ready, torch.cat(hidden), verify)
        self._record(len(ready))

    def _record(self, new_tokens: int) -> None:
        self.metrics.record_step(new_tokens, len(self.scheduler.waiting), len(self.scheduler.running),
                                 self.pool.used_blocks, self.pool.num_blocks)

    def _decode(self, decodes: list[Seq]) -> tuple[torch.Tensor, _Verify | None]:
        """One forward over every decoding sequence: its pending token, then (speculating sequences) a
        drafted one. Returns the hidden states at the pending tokens [B, H] and what verification needs."""
        spec = [i for i, s in enumerate(decodes)
                if self.speculator is not None and self.speculator.speculates(s) and s.mtp_ids]
        pending = torch.tensor([s.output[-1] if s.output else s.prompt[-1] for s in decodes], device=self.device)
        ids = pending.unsqueeze(1)
        if spec:
            index = torch.tensor(spec, device=self.device)
            drafts = self.speculator.draft([decodes[i] for i in spec])
            ids = torch.cat((ids, torch.zeros_like(ids).index_copy(0, index, drafts.unsqueeze(1))), dim=1)
        new = [1] * len(decodes)
        for i in spec:
            new[i] = 2
        rows = torch.tensor([s.row for s in decodes], device=self.device)
        step = PagedStep(self.pool, self.block_tables.index_select(0, rows), [s.computed for s in decodes], new,
                         self.attention_path)
        h = self.model.hidden_states(ids, cache=step)  # [B, 1 or 2, H]
        for seq in decodes:
            seq.computed += 1
        if not spec:
            return h[:, 0], None
        after = h.index_select(0, index)[:, 1]  # [S, H] hidden state at each draft
        bonus = self.model.lm_head(after).argmax(dim=-1)
        return h[:, 0], _Verify(spec, drafts, bonus, h.index_select(0, index))

    def _prefill(self, group: list[tuple[Seq, int]]) -> tuple[torch.Tensor, list[Seq]]:
        """One forward over prompt chunks (right-padded to the longest); returns the last hidden state
        of each sequence whose prompt is now complete, and those sequences."""
        T = max(chunk for _, chunk in group)
        ids = torch.zeros(len(group), T, dtype=torch.long)
        for i, (seq, chunk) in enumerate(group):
            tokens = seq.prompt if seq.computed + chunk <= len(seq.prompt) else seq.tokens
            ids[i, :chunk] = torch.tensor(tokens[seq.computed:seq.computed + chunk])
        rows = torch.tensor([seq.row for seq, _ in group], device=self.device)
        step = PagedStep(self.pool, self.block_tables.index_select(0, rows), [seq.computed for seq, _ in group],
                         [chunk for _, chunk in group], self.attention_path)
        h = self.model.hidden_states(ids.to(self.device), cache=step)  # [B, T, hidden]
        if self.speculator is not None:
            self.speculator.catch_up_prompt(group, [seq.computed for seq, _ in group], h)
        done, last = [], []
        for i, (seq, chunk) in enumerate(group):
            seq.computed += chunk
            if seq.pending == 0:
                done.append(seq)
                last.append(i * T + chunk - 1)
        picked = h.flatten(0, 1).index_select(0, torch.tensor(last, dtype=torch.long, device=h.device))
        return picked, done

    def _sample(self, ready: list[Seq], hidden: torch.Tensor, verify: _Verify | None = None) -> None:
        logits = self.model.lm_head(hidden)
        inputs = SamplerInputs.build([s.sampling for s in ready], [s.seed for s in ready],
                                     [len(s.output) for s in ready], logits.shape[-1], self.device)
        counts = seen = None
        if inputs.any_penalty:
            rows = torch.tensor([s.row for s in ready], device=self.device)
            counts, seen = self._counts.index_select(0, rows), self._seen.index_select(0, rows)
        out = sample(logits, inputs, counts, seen)
        penalised = [i for i, s in enumerate(ready) if s.sampling.uses_penalties]
        if penalised:
            index = torch.tensor(penalised, device=self.device)
            rows = torch.tensor([ready[i].row for i in penalised], device=self.device)
            picked = out.tokens.index_select(0, index)
            self._counts.index_put_((rows, picked), torch.ones_like(picked, dtype=torch.int32), accumulate=True)
            self._seen[rows, picked] = True
        n = len(ready)
        if verify is not None:  # the drafted rows are the first of `ready` (decodes come first)
            index = torch.tensor(verify.rows, device=self.device)
            accepted = out.tokens.index_select(0, index) == verify.drafts
            tokens = torch.cat((out.tokens, accepted.long(), verify.bonus)).tolist()  # one host sync
            accepted_rows = {row: bool(a) for row, a in zip(verify.rows, tokens[n:n + len(verify.rows)])}
            bonus_of = dict(zip(verify.rows, tokens[n + len(verify.rows):]))
            slot_of = {row: j for j, row in enumerate(verify.rows)}
            self.metrics.accepted += sum(accepted_rows.values())
        else:
            tokens = out.tokens.tolist()  # the step's one host synchronisation
        token_lp = out.logprobs.tolist() if out.logprobs is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        now = time.perf_counter()
        for i, seq in enumerate(ready):
            lp = None
            if seq.sampling.logprobs is not None:
                k = seq.sampling.logprobs
                top = list(zip(top_ids[i][:k], top_lp[i][:k])) if k else []
                lp = [TokenLogprob(tokens[i], token_lp[i], top)]
            try:
                self._append(seq, tokens[i], lp, now)
                if self.speculator is not None and seq.status is not Status.FINISHED \
                        and self.speculator.speculates(seq):
                    if verify is not None and i in slot_of:
                        j = slot_of[i]
                        if accepted_rows[i]:
                            seq.computed += 1  # the draft's slot is kept: it was the model's own token
                            seq.mtp_hidden, seq.mtp_ids = verify.hidden[j], [tokens[i], bonus_of[i]]
                            self._append(seq, bonus_of[i], None, now)
                        else:
                            seq.mtp_hidden, seq.mtp_ids = verify.hidden[j, :1], [tokens[i]]
                    else:  # its prompt just ended (or it had a one-token prompt): first MTP input
                        seq.mtp_hidden, seq.mtp_ids = hidden[i:i + 1], [tokens[i]]
            except Exception as exc:  # noqa: BLE001 - one request's failure stays its own
                log.exception("output processing failed for sequence %d", seq.seq_id)
                self._end(seq, Delta(seq.choice, [], "", finish_reason="error", error=f"{type(exc).__name__}: {exc}"))

    def _append(self, seq: Seq, token: int, logprobs: list[TokenLogprob] | None, now: float) -> None:
        if seq.last_token_time is None:
            self.metrics.ttft.observe(now - seq.arrival)
        else:
            self.metrics.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        seq.output.append(token)
        finish = None
        detok = seq.detokenizer
        if token in seq.stop_ids:
            finish, text = "stop", ("" if detok is None else detok.flush())
        else:
            text = "" if detok is None else detok.push([token])
            if detok is not None and detok.stopped is not None:
                finish = "stop"
            elif len(seq.output) >= seq.max_tokens or seq.length >= self.context:
                finish = "length"
                text += "" if detok is None else detok.flush()
        delta = Delta(seq.choice, [token], text, logprobs, finish)
        if finish is None:
            seq.request._push(delta)
        else:
            self._end(seq, delta)

    def _end(self, seq: Seq, delta: Delta) -> None:
        self.scheduler.finish(seq)
        with self.metrics.lock:
            self.metrics.finished[delta.finish_reason] += 1
        self.metrics.e2e.observe(time.perf_counter() - seq.arrival)
        seq.request._push(delta)
