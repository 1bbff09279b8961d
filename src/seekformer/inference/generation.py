"""Text generation: batched prompts, greedy or sampled decoding, streaming, MTP speculative decoding.

    out = generate(model, input_ids, max_new_tokens=128, temperature=0.7, top_p=0.9, seed=0)
    out.tokens[0], out.stats.decode_tokens_per_s
    for piece in generate(model, input_ids, stream=True): print(piece.tokens)
    out = generate(model, input_ids, speculative="mtp")

Prompts of different lengths are left-padded internally (or pass a padded tensor with its
`attention_mask`). Rows that finish leave the batch, so the rest decode at the smaller batch size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..model.packed_weights import pack_for_generation
from .cache import ATTENTION_PATHS, KVCache
from .sampling import SamplingParams, next_tokens
from .speculative import MTPDrafter, speculative_step

SPECULATIVE_METHODS = ("mtp",)


@dataclass
class GenerationStats:
    """Counts and timings of one `generate` call (tokens summed over the batch)."""

    batch_size: int = 0
    prompt_tokens: int = 0  # real (unpadded) prompt tokens
    new_tokens: int = 0  # generated tokens, stop tokens included
    prefill_seconds: float = 0.0  # prompt forward (and MTP prompt pass) up to the first new token
    decode_seconds: float = 0.0  # everything after the first new token
    decode_steps: int = 0  # forward passes of the main model after the prefill
    drafted: int = 0  # speculative rounds x rows (each drafts num_draft_tokens tokens)
    accepted_per_depth: list[int] = field(default_factory=list)  # rounds whose first j+1 drafts were kept
    cache_bytes_per_token: int = 0  # main-model cache, per token and row, all layers
    cache_bytes: int = 0  # main-model cache buffers allocated at the end

    @property
    def decode_tokens(self) -> int:
        """Tokens produced after the prefill (each row's first new token comes from the prefill)."""
        return max(self.new_tokens - self.batch_size, 0)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Share of speculative rounds whose first drafted token was accepted (None without drafts)."""
        return self.accepted_per_depth[0] / self.drafted if self.drafted else None

    @property
    def acceptance_per_depth(self) -> list[float]:
        """P(drafts 1..j all accepted) for j = 1..num_draft_tokens."""
        return [a / self.drafted for a in self.accepted_per_depth] if self.drafted else []

    @property
    def mean_accepted(self) -> float | None:
        """Drafted tokens kept per round, on average."""
        return sum(self.accepted_per_depth) / self.drafted if self.drafted else None

    def record_round(self, accepted: torch.Tensor, num_draft: int) -> None:
        """Count one speculative round of every running row: `accepted` [B] drafts kept per row."""
        self.drafted += accepted.shape[0]
        hits = (accepted.unsqueeze(1) > torch.arange(num_draft, device=accepted.device)).sum(dim=0).tolist()
        previous = self.accepted_per_depth or [0] * num_draft
        self.accepted_per_depth = [a + b for a, b in zip(previous, hits)]

    def as_dict(self) -> dict[str, float | int | list[float] | None]:
        return {
            "batch_size": self.batch_size, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds,
            "prefill_tokens_per_s": self.prefill_tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s,
            "decode_steps": self.decode_steps, "acceptance_rate": self.acceptance_rate,
            "acceptance_per_depth": self.acceptance_per_depth, "mean_accepted": self.mean_accepted,
            "cache_bytes_per_token": self.cache_bytes_per_token, "cache_bytes": self.cache_bytes,
        }


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # new tokens of each row, its stop token included
    finish_reasons: list[str]  # per row: "stop" (a stop token) or "length" (max_new_tokens / context)
    stats: GenerationStats


@dataclass(frozen=True)
class Piece:
    """Tokens a row gained in one decoding step (several with speculative decoding)."""

    row: int
    tokens: list[int]
    finish_reason: str | None = None  # set on the row's last piece


class GenerationStream:
    """Iterator of `Piece`s; `output` holds the `GenerationOutput` once it is exhausted."""

    def __init__(self, pieces: Iterator[Piece], result: list[GenerationOutput]) -> None:
        self._pieces, self._result = pieces, result

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> Piece:
        return next(self._pieces)

    @property
    def output(self) -> GenerationOutput | None:
        return self._result[0] if self._result else None


# ---------------------------------------------------------------------------- prompts
@dataclass
class _Prompts:
    ids: torch.Tensor  # [B, P]
    mask: torch.Tensor | None  # [B, P] bool, None when nothing is padded
    lengths: torch.Tensor  # [B] real tokens per row
    last: torch.Tensor  # [B] index of each row's last real token


def _prepare_prompts(model, input_ids, attention_mask, pad_token_id: int | None) -> _Prompts:
    config, device = model.config, model.device
    pad = pad_token_id if pad_token_id is not None else (config.pad_token_id or 0)
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
        if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids must be integer token ids [batch, seq] or [seq], "
                             f"got {tuple(input_ids.shape)} {input_ids.dtype}")
        ids = ids.long()
        if attention_mask is not None:
            mask = attention_mask.unsqueeze(0) if attention_mask.dim() == 1 else attention_mask
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
            mask = mask.bool()
        else:
            mask = None
    else:
        rows = _as_rows(input_ids)
        if attention_mask is not None:
            raise ValueError("attention_mask is only accepted with a tensor of input_ids; "
                             "lists of prompts are padded internally")
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, row in enumerate(rows):
            if row:
                ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
                mask[i, width - len(row):] = True
    if ids.shape[0] == 0:
        raise ValueError("no prompts given (batch of size 0)")
    B, P = ids.shape
    ids = ids.to(device)
    mask = None if mask is None or bool(mask.all()) else mask.to(device)
    if mask is None:
        lengths = torch.full((B,), P, dtype=torch.long, device=device)
        first = torch.zeros(B, dtype=torch.long, device=device)
        last = torch.full((B,), P - 1, dtype=torch.long, device=device)
    else:
        lengths = mask.sum(dim=1)
        span = torch.arange(P, device=device)
        first = torch.where(mask, span, P).amin(dim=1)
        last = torch.where(mask, span, -1).amax(dim=1)
    empty = (lengths == 0).nonzero().flatten().tolist()
    if P == 0 or empty:
        which = "" if P == 0 else f" (row{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))})"
        raise ValueError(f"empty prompt{which}: generation needs at least one token to condition on")
    if bool((last - first + 1 != lengths).any()):
        raise ValueError("each prompt's real tokens must be contiguous (left or right padding only)")
    real = ids if mask is None else ids[mask]
    if bool(((real < 0) | (real >= config.vocab_size)).any()):
        raise ValueError(f"prompt token ids must be in [0, vocab_size={config.vocab_size})")
    longest = int(lengths.max())
    if longest > config.max_position_embeddings:
        raise ValueError(f"prompt of {longest} tokens is longer than the model's context "
                         f"(max_position_embeddings={config.max_position_embeddings})")
    return _Prompts(ids, mask, lengths, last)


def _distinct_prompts(prompts: _Prompts) -> tuple[_Prompts, torch.Tensor] | None:
    """The distinct rows of `prompts` (same ids where real, same padding) and the distinct row of each
    row, or None when every row is distinct."""
    ids = prompts.ids if prompts.mask is None else torch.where(prompts.mask, prompts.ids, -1)
    distinct, row_of = torch.unique(ids, dim=0, return_inverse=True)
    if distinct.shape[0] == ids.shape[0]:
        return None
    first = torch.full((distinct.shape[0],), ids.shape[0], dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, row_of, torch.arange(ids.shape[0], device=ids.device), "amin")
    mask = None if prompts.mask is None else prompts.mask.index_select(0, first)
    picked = _Prompts(prompts.ids.index_select(0, first), mask, prompts.lengths.index_select(0, first),
                      prompts.last.index_select(0, first))
    return picked, row_of


def _as_rows(input_ids) -> list[list[int]]:
    def ids_only(seq) -> bool:
        return all(isinstance(t, int) and not isinstance(t, bool) for t in seq)

    if isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes)):
        if len(input_ids) == 0:
            raise ValueError("empty prompt: generation needs at least one token to condition on")
        if ids_only(input_ids):
            return [list(input_ids)]
        if all(isinstance(r, Sequence) and not isinstance(r, (str, bytes)) and ids_only(r) for r in input_ids):
            return [list(r) for r in input_ids]
    raise ValueError("input_ids must be a LongTensor, a list of token ids or a list of such lists "
                     f"(got {type(input_ids).__name__}); encode text with the tokenizer first")


def _stop_ids(model, stop_tokens) -> list[int]:
    if stop_tokens is None:
        stop_tokens = model.config.eos_token_id
    if stop_tokens is None:
        return []
    if isinstance(stop_tokens, int):
        return [stop_tokens]
    ids = list(stop_tokens)
    if not all(isinstance(t, int) for t in ids):
        raise ValueError(f"stop_tokens must be token ids, got {stop_tokens!r}")
    return ids


# ---------------------------------------------------------------------------- output bookkeeping
class _Outputs:
    """Generated tokens of every row, written in place; tracks which rows are still running."""

    def __init__(self, batch: int, limits: torch.Tensor, stop_ids: list[int], device) -> None:
        self.limits = limits  # [B] max new tokens of each row
        self.buf = torch.zeros(batch, max(int(limits.max()), 1), dtype=torch.long, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.stopped = torch.zeros(batch, dtype=torch.bool, device=device)
        self.stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
        self.rows = torch.arange(batch, device=device)  # original row of each running row

    def emit(self, tokens: torch.Tensor, n_valid: torch.Tensor, stream: bool) -> tuple[torch.Tensor, list[Piece]]:
        """Append the first n_valid[i] of tokens[i] ([B', n]) to each running row, cut at a stop token
        or the row's limit. Returns which running rows are finished, and the pieces if `stream`."""
        n = tokens.shape[1]
        rows = self.rows
        span = torch.arange(n, device=tokens.device)
        is_stop = torch.isin(tokens, self.stop) & (span < n_valid.unsqueeze(1))
        first_stop = torch.where(is_stop, span, n).amin(dim=1)
        room = self.limits[rows] - self.count[rows]
        keep = torch.minimum(torch.minimum(n_valid, first_stop + 1), room)
        write = span < keep.unsqueeze(1)
        index = (self.count[rows].unsqueeze(1) + span).clamp(max=self.buf.shape[1] - 1)
        self.buf[rows.unsqueeze(1).expand(-1, n)[write], index[write]] = tokens[write]
        self.count[rows] += keep
        stopped = first_stop < keep
        self.stopped[rows] |= stopped
        finished = stopped | (self.count[rows] >= self.limits[rows])
        pieces: list[Piece] = []
        if stream:
            for row, toks, k, done, stop in zip(rows.tolist(), tokens.tolist(), keep.tolist(),
                                                finished.tolist(), stopped.tolist()):
                if k or done:
                    pieces.append(Piece(row, toks[:k], ("stop" if stop else "length") if done else None))
        return finished, pieces

    def result(self, stats: GenerationStats) -> GenerationOutput:
        counts = self.count.tolist()
        tokens = [row[:c] for row, c in zip(self.buf.tolist(), counts)]
        reasons = ["stop" if s else "length" for s in self.stopped.tolist()]
        stats.new_tokens = sum(counts)
        return GenerationOutput(tokens, reasons, stats)


# ---------------------------------------------------------------------------- generate
def generate(
    model,
    input_ids,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_tokens: int | Sequence[int] | None = None,
    stream: bool = False,
    speculative: str | None = None,
    num_draft_tokens: int | None = None,
    prefill_chunk: int | None = None,
    pad_token_id: int | None = None,
    attention_path: str = "auto",
    pack_weights: bool | None = None,
    share_prompts: bool = True,
) -> GenerationOutput | GenerationStream:
    """Continue each prompt with up to `max_new_tokens` tokens.

    input_ids: a LongTensor [B, P] (with `attention_mask` if padded) or [P], a list of ids, or a list
    of such lists of any lengths. `temperature` 0 is greedy; otherwise sampling with optional
    `top_k`/`top_p`, reproducible with `seed`. `stop_tokens` defaults to the config's eos_token_id
    (pass [] for none). A row also stops at the model's context length. `stream=True` returns a
    `GenerationStream` of `Piece`s. `speculative="mtp"` drafts `num_draft_tokens` tokens (default: the
    number of MTP modules) with the model's Multi-Token Prediction modules and verifies them in one
    forward pass; greedy output is unchanged and sampled output keeps its distribution.
    `prefill_chunk` processes long prompts in pieces of that many tokens. `attention_path` ("auto",
    "naive", "absorbed") picks the MLA computation per step (see `KVCache`). `pack_weights`: None packs a
    bf16 CPU model's weights for oneDNN's decode products when the packs fit in a quarter of the
    available memory, True whatever the memory, False packs nothing; packs are kept for later calls
    while the weights are unchanged (`seekformer.model.packed_weights.release_packs` frees them).
    `share_prompts`: rows whose prompts are identical (GRPO's group of completions of one prompt, `n`
    samples of one request) run the prompt's prefill once and copy its cache into each row; the rows
    then decode independently, with the same computation as when each row ran its own prefill (not
    with speculative decoding, whose drafter keeps every row's prompt states). The values are the
    same up to float32 summation order: on a bf16 CPU model the products of a few rows and of many
    can run in different kernels, so a near-tie may sample differently.
    """
    params = SamplingParams(temperature, top_k, top_p)
    if attention_path not in ATTENTION_PATHS:
        raise ValueError(f"attention_path must be one of {ATTENTION_PATHS}, got {attention_path!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
    if speculative is not None:
        if speculative not in SPECULATIVE_METHODS:
            raise ValueError(f"unknown speculative method {speculative!r}; supported: {SPECULATIVE_METHODS}")
        if not len(model.mtp):
            raise ValueError("speculative='mtp' needs a model with Multi-Token Prediction modules, but this "
                             "model has none (num_nextn_predict_layers=0)")
        if num_draft_tokens is None:
            num_draft_tokens = len(model.mtp)
        if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be a positive integer, got {num_draft_tokens!r}")
    elif num_draft_tokens is not None:
        raise ValueError("num_draft_tokens is only used with speculative='mtp'")
    if pack_weights not in (None, True, False):
        raise ValueError(f"pack_weights must be None (automatic), True or False, got {pack_weights!r}")
    if share_prompts not in (True, False):
        raise ValueError(f"share_prompts must be True or False, got {share_prompts!r}")
    prompts = _prepare_prompts(model, input_ids, attention_mask, pad_token_id)
    shared = _distinct_prompts(prompts) if share_prompts and speculative is None else None
    if pack_weights is not False:
        pack_for_generation(model, check_memory=pack_weights is None)
    stop_ids = _stop_ids(model, stop_tokens)
    generator = torch.Generator(device=model.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    result: list[GenerationOutput] = []
    # with shared prompts the cache holds the distinct prompts until the prefill copies them into every row
    cache_rows = prompts.ids.shape[0] if shared is None else shared[0].ids.shape[0]
    cache = KVCache.for_model(model, cache_rows, attention_path=attention_path)
    cache.max_rollback = num_draft_tokens if speculative else 0
    # the prompt, the new tokens and a speculative step's drafts, up to the context length
    cache.reserve(min(prompts.ids.shape[1] + max_new_tokens + (num_draft_tokens or 0),
                      model.config.max_position_embeddings + (num_draft_tokens or 0)))
    pieces = _run(model, prompts, cache, params, generator, max_new_tokens, stop_ids, stream,
                  num_draft_tokens if speculative else 0, prefill_chunk, result, shared)
    if stream:
        return GenerationStream(pieces, result)
    for _ in pieces:
        pass
    return result[0]


def _run(model, prompts: _Prompts, cache: KVCache, params: SamplingParams, generator, max_new_tokens: int,
         stop_ids: list[int], stream: bool, num_draft: int, prefill_chunk: int | None,
         result: list[GenerationOutput], shared: tuple[_Prompts, torch.Tensor] | None = None) -> Iterator[Piece]:
    """The decoding loop, as a generator of pieces; appends the output to `result` when done.

    Computation runs under inference mode, the yields outside it: the caller's code between pieces
    does not inherit the mode. The model is in eval mode meanwhile, then back in its own."""
    training = model.training
    model.eval()  # no dropout, and MoE layers do not count routed tokens for load balancing
    try:
        decoding = _Decoding(model, prompts, cache, params, generator, max_new_tokens, stop_ids, num_draft, shared)
        yield from decoding.prefill(prefill_chunk, stream)
        while not decoding.done:
            yield from decoding.step(stream)
        result.append(decoding.result())
    finally:
        model.train(training)


class _Decoding:
    """State of one generate call: the cache, the drafter, the pending token of each running row."""

    def __init__(self, model, prompts: _Prompts, cache: KVCache, params: SamplingParams, generator,
                 max_new_tokens: int, stop_ids: list[int], num_draft: int,
                 shared: tuple[_Prompts, torch.Tensor] | None = None) -> None:
        self.model, self.prompts, self.cache, self.params, self.generator = model, prompts, cache, params, generator
        self.shared = shared  # (the distinct prompts, the distinct prompt of each row) or None
        self.num_draft = num_draft
        B = prompts.ids.shape[0]
        self.stats = GenerationStats(batch_size=B, prompt_tokens=int(prompts.lengths.sum()))
        limits = (model.config.max_position_embeddings - prompts.lengths).clamp(max=max_new_tokens)
        self.out = _Outputs(B, limits, stop_ids, model.device)
        self.drafter: MTPDrafter | None = None
        self.pending = torch.empty(0)
        self.finished = torch.zeros(B, dtype=torch.bool)
        self.done = False
        self.started = 0.0

    @torch.inference_mode()
    def prefill(self, chunk: int | None, stream: bool) -> list[Piece]:
        model, prompts = self.model, self.prompts
        start = time.perf_counter()
        if self.shared is None:
            h_all, h_last = _prefill(model, prompts, self.cache, chunk, keep_all=self.num_draft > 0)
        else:  # each distinct prompt once, then its cache rows and last hidden state copied into its rows
            distinct, row_of = self.shared
            h_all, h_last = _prefill(model, distinct, self.cache, chunk, keep_all=False)
            self.cache.select(row_of)
            h_last = h_last.index_select(0, row_of)
        self.pending = next_tokens(model.lm_head(h_last), self.params, self.generator)  # [B]
        if self.num_draft:
            self.drafter = MTPDrafter(model, prompts.ids.shape[0], self.num_draft, self.params, self.generator)
            self.drafter.prefill(h_all, prompts.ids, prompts.mask, prompts.last, self.pending, chunk)
        self.stats.prefill_seconds = time.perf_counter() - start
        self.started = time.perf_counter()
        return self._emit(self.pending.unsqueeze(1), torch.ones_like(self.pending), stream)

    @torch.inference_mode()
    def step(self, stream: bool) -> list[Piece]:
        if bool(self.finished.any()):  # finished rows leave the batch
            keep = (~self.finished).nonzero().flatten()
            self.out.rows, self.pending = self.out.rows[keep], self.pending[keep]
            self.cache.select(keep)
            if self.drafter is not None:
                self.drafter.select(keep)
        if self.drafter is None:
            logits = self.model(self.pending.unsqueeze(1), cache=self.cache)[:, -1]
            self.pending = next_tokens(logits, self.params, self.generator)
            new, n_new = self.pending.unsqueeze(1), torch.ones_like(self.pending)
        else:
            new, accepted, self.pending = speculative_step(self.model, self.cache, self.drafter, self.pending,
                                                           self.params, self.generator)
            self.stats.record_round(accepted, self.num_draft)
            n_new = accepted + 1
        self.stats.decode_steps += 1
        return self._emit(new, n_new, stream)

    def _emit(self, new: torch.Tensor, n_new: torch.Tensor, stream: bool) -> list[Piece]:
        self.finished, pieces = self.out.emit(new, n_new, stream)
        self.done = bool(self.finished.all())
        if self.done:
            self.stats.decode_seconds = time.perf_counter() - self.started
        return pieces

    def result(self) -> GenerationOutput:
        self.stats.cache_bytes_per_token, self.stats.cache_bytes = self.cache.bytes_per_token(), self.cache.nbytes()
        return self.out.result(self.stats)


def _prefill(model, prompts: _Prompts, cache: KVCache, chunk: int | None,
             keep_all: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Run the prompts through the model into `cache`; return all hidden states (if `keep_all`) and
    each row's hidden state at its last real token [B, hidden]."""
    ids, mask = prompts.ids, prompts.mask
    B, P = ids.shape
    chunk = chunk or P
    parts = []
    h_last = None
    for begin in range(0, P, chunk):
        end = min(begin + chunk, P)
        rows = (prompts.last - begin).clamp(0, end - begin - 1)
        # without MTP only each row's last token is wanted: the last layer runs from there alone
        h = model.hidden_states(ids[:, begin:end], None if mask is None else mask[:, begin:end], cache=cache,
                                rows=None if keep_all else rows)
        inside = (prompts.last >= begin) & (prompts.last < end)
        picked = h[torch.arange(B, device=h.device), rows] if keep_all else h[:, 0]
        h_last = picked if h_last is None else torch.where(inside.unsqueeze(1), picked, h_last)
        if keep_all:
            parts.append(h)
    return (torch.cat(parts, dim=1) if keep_all else None), h_last
