"""Per-request sampling for a batch whose rows each follow their own parameters.

Every row of a decode step can have its own temperature, top-k, top-p, min-p, penalties and seed,
and the whole batch is processed by a few tensor operations (no loop over rows). Order, as in
vLLM: penalties, temperature, top-k, top-p, min-p, then a draw.

Draws use counter-based noise instead of a stateful generator: the Gumbel noise of token v at a
request's i-th generated token is a hash of (seed, i, v). A request's tokens therefore depend on its
own seed only, never on which other requests share the batch or in what order, and a preempted and
recomputed request draws the same tokens again. argmax(logits / T + Gumbel) is an exact sample of
softmax(logits / T) (the Gumbel-max trick), and needs no host synchronisation.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import RequestError

MAX_TOP_LOGPROBS = 20
_MASK32 = 0xFFFFFFFF


def _number(name: str, value, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
        raise RequestError(name, f"must be a finite number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise RequestError(name, f"must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise RequestError(name, f"must be <= {high}, got {value!r}")
    return float(value)


def _integer(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RequestError(name, f"must be {bound}, got {value!r}")
    return value


@dataclass(frozen=True)
class RequestSampling:
    """How one request picks its tokens and when it stops (OpenAI request fields, validated)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI: subtract once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per earlier occurrence in the output
    repetition_penalty: float = 1.0  # transformers/CTRL: divide (or multiply) the logits of seen tokens
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None: none; k: the sampled token's log-prob and the k most likely
    skip_special_tokens: bool = True
    _resolved_seed: int = field(default=0, repr=False, compare=False)

    def __post_init__(self) -> None:
        _integer("max_tokens", self.max_tokens, 1)
        _number("temperature", self.temperature, 0.0)
        _number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _integer("top_k", self.top_k, -1)
        _number("min_p", self.min_p, 0.0, 1.0)
        _number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _number("repetition_penalty", self.repetition_penalty, 0.0, low_open=True)
        if self.seed is not None:
            _integer("seed", self.seed, -(2**63), 2**64 - 1)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
            raise RequestError("stop", f"must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            raise RequestError("stop_token_ids", f"must be non-negative token ids, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _integer("n", self.n, 1, 128)
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS)
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        object.__setattr__(self, "_resolved_seed", seed & (2**64 - 1))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def choice_seed(self, index: int) -> int:
        """The seed of choice `index` of an n > 1 request (choice 0 keeps the request's seed)."""
        return self._resolved_seed if index == 0 else _mix_int(self._resolved_seed, index)


def _mix_int(a: int, b: int) -> int:
    """A 64-bit mix of two integers (host side, for per-choice seeds)."""
    x = (a * 0x9E3779B97F4A7C15 + b * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    return x ^ (x >> 29)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """An avalanche hash of int64 tensors holding 32-bit values (products stay below 2**63)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel noise [B, vocab] (float32) from seeds [B] (int64, any 64-bit pattern) and the index of the
    token being drawn [B]: a pure function of (seed, step, token id)."""
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    key = _hash32(_hash32(lo ^ _hash32(hi)) ^ steps)  # [B]
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _hash32(_hash32(key.unsqueeze(1) ^ ids) + key.unsqueeze(1) & _MASK32)  # [B, V]
    u = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1), exact in float32
    return -torch.log(-torch.log(u))


@dataclass
class SamplerInputs:
    """The per-row parameters of one step, as tensors on the logits' device."""

    temperature: torch.Tensor  # [B] float (greedy rows: 1, unused)
    greedy: torch.Tensor  # [B] bool
    top_k: torch.Tensor  # [B] long, V for no limit
    top_p: torch.Tensor  # [B] float
    min_p: torch.Tensor  # [B] float
    presence: torch.Tensor  # [B] float
    frequency: torch.Tensor  # [B] float
    repetition: torch.Tensor  # [B] float
    seeds: torch.Tensor  # [B] int64
    steps: torch.Tensor  # [B] int64: index of the token being drawn in its request's output
    any_sampled: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    any_penalty: bool
    max_logprobs: int | None  # largest top_logprobs asked in the batch, None when no row wants logprobs

    @classmethod
    def build(cls, params: Sequence[RequestSampling], seeds: Sequence[int], steps: Sequence[int], vocab: int,
              device: torch.device) -> SamplerInputs:
        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        greedy = [p.greedy for p in params]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32),
            greedy=tensor(greedy, torch.bool),
            top_k=tensor(top_k, torch.long),
            top_p=tensor([p.top_p for p in params], torch.float32),
            min_p=tensor([p.min_p for p in params], torch.float32),
            presence=tensor([p.presence_penalty for p in params], torch.float32),
            frequency=tensor([p.frequency_penalty for p in params], torch.float32),
            repetition=tensor([p.repetition_penalty for p in params], torch.float32),
            seeds=tensor([s - 2**64 if s >= 2**63 else s for s in seeds], torch.int64),
            steps=tensor(list(steps), torch.int64),
            any_sampled=not all(greedy),
            any_top_k=any(not g and k < vocab for g, k in zip(greedy, top_k)),
            any_top_p=any(not g and p.top_p < 1 for g, p in zip(greedy, params)),
            any_min_p=any(not g and p.min_p > 0 for g, p in zip(greedy, params)),
            any_penalty=any(p.uses_penalties for p in params),
            max_logprobs=max(asked) if asked else None,
        )


@dataclass
class SampleOutput:
    tokens: torch.Tensor  # [B] long
    logprobs: torch.Tensor | None  # [B] float: log-prob of each sampled token (the model's distribution)
    top_ids: torch.Tensor | None  # [B, k] the k most likely tokens
    top_logprobs: torch.Tensor | None  # [B, k]


def apply_penalties(logits: torch.Tensor, inputs: SamplerInputs, output_counts: torch.Tensor,
                    seen: torch.Tensor) -> torch.Tensor:
    """Presence/frequency penalties from `output_counts` [B, V] (generated tokens) and the repetition
    penalty over `seen` [B, V] bool (prompt and generated tokens)."""
    counts = output_counts.to(logits.dtype)
    logits = logits - inputs.frequency.unsqueeze(1) * counts - inputs.presence.unsqueeze(1) * (counts > 0)
    rep = inputs.repetition.unsqueeze(1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    return torch.where(seen, penalised, logits)


def sample(logits: torch.Tensor, inputs: SamplerInputs, output_counts: torch.Tensor | None = None,
           seen: torch.Tensor | None = None) -> SampleOutput:
    """Next token of every row of logits [B, V] under its own parameters."""
    raw = logits.float()
    B, V = raw.shape
    top_ids = top_lp = token_lp = None
    logits = raw
    if inputs.any_penalty:
        logits = apply_penalties(logits, inputs, output_counts, seen)
    tokens = logits.argmax(dim=-1)
    if inputs.any_sampled:
        scaled = logits / inputs.temperature.unsqueeze(1)
        if inputs.any_top_k or inputs.any_top_p:
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
            if inputs.any_top_k:
                kth = sorted_logits.gather(1, (inputs.top_k - 1).unsqueeze(1))
                sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
            if inputs.any_top_p:
                probs = sorted_logits.softmax(dim=-1)
                # drop a token once the tokens ranked above it already hold top_p (the first stays)
                drop = probs.cumsum(dim=-1) - probs >= inputs.top_p.unsqueeze(1)
                sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            scaled = torch.empty_like(scaled).scatter_(1, order, sorted_logits)
        if inputs.any_min_p:
            probs = scaled.softmax(dim=-1)
            floor = inputs.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
            scaled = scaled.masked_fill(probs < floor, float("-inf"))
        drawn = (scaled + gumbel_noise(inputs.seeds, inputs.steps, V)).argmax(dim=-1)
        tokens = torch.where(inputs.greedy, tokens, drawn)
    if inputs.max_logprobs is not None:
        logp = raw.log_softmax(dim=-1)
        token_lp = logp.gather(1, tokens.unsqueeze(1)).squeeze(1)
        if inputs.max_logprobs:
            top_lp, top_ids = logp.topk(inputs.max_logprobs, dim=-1)
    return SampleOutput(tokens, token_lp, top_ids, top_lp)
