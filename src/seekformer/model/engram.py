"""Engram conditional memory: hashed N-gram embeddings fused into the residual stream.

For every position the module looks up static embeddings of the suffix N-grams (orders 2..N) of
the *compressed* token ids, mixes them with a scalar gate computed against the current hidden
state, and smooths the result with a short causal depthwise convolution:

    x'      = P(x)                                     tokenizer compression (raw id -> canonical id)
    z_{n,j} = hash_{n,j}(x'_t, ..., x'_{t-n+1})         one row per order n and head j
    e_t     = concat_{n,j} E[offset_{n,j} + z_{n,j}]   [(N-1) * engram_dim_per_ngram]
    alpha_t = sigmoid(signed_sqrt(<RMSNorm(h_t), RMSNorm(W_K e_t)> / sqrt(d)))
    v~_t    = alpha_t * W_V e_t
    Y       = v~ + SiLU(CausalDepthwiseConv(RMSNorm(v~)))   (kernel w, dilation N, zero-initialised)

The block adds Y to its hidden state before attention. See docs/engram.md.

Constants shared with the official Engram demo (github.com/deepseek-ai/Engram, `engram_demo_v1.py`),
which is their source: the token normaliser (NFKC, NFD, strip accents, per-character lowercase,
whitespace runs to one space, strip, a lone space kept), the U+FFFD rule for partial byte tokens, the
multiplier seed `seed + 10007 * layer_id` with odd multipliers below `(2**63 - 1) // V'`, and the prime
walk over layers, orders and heads.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm

__all__ = [
    "Engram",
    "EngramState",
    "compression_table",
    "engram_multipliers",
    "engram_primes",
    "normalize_token_text",
]

# Unicode White_Space characters (what `str.strip` removes, minus the C0 separators \x1c-\x1f that
# Python also counts as space but Unicode does not).
_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)
_SPACE_RUN = re.compile(r"[ \t\r\n]+")


# ---------------------------------------------------------------------------------------- compression
def _lowercase(text: str) -> str:
    """Lowercase character by character, as the `tokenizers` Lowercase normaliser of the official demo
    does: no context rules, so a word-final capital sigma becomes σ where `str.lower()` gives ς."""
    return "".join(c.lower() for c in text)


def normalize_token_text(text: str) -> str:
    """Canonical form of one token's text: NFKC, NFD, strip accents, lowercase, collapse spaces, strip.

    Runs of space/tab/CR/LF become one space; a text that collapses to exactly one space stays one
    space; an otherwise empty result keeps the original text.
    """
    s = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    s = _lowercase("".join(c for c in s if not unicodedata.category(c).startswith("M")))
    s = _SPACE_RUN.sub(" ", s)
    if s == " ":
        return s
    return s.strip(_WHITESPACE) or text


class _TokenizerView:
    """Uniform access to a tokenizer's size, single-id decode and raw token strings."""

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers import Tokenizer

        self.outer = tokenizer
        self.inner: Tokenizer | None = None
        if isinstance(tokenizer, Tokenizer):
            self.inner = tokenizer
        else:
            for name in ("backend", "tokenizer", "_tokenizer", "backend_tokenizer"):  # seekformer, others, transformers
                candidate = getattr(tokenizer, name, None)
                if isinstance(candidate, Tokenizer):
                    self.inner = candidate
                    break
        self.size = self._size()

    def _size(self) -> int:
        tok = self.outer
        if self.inner is tok:
            return tok.get_vocab_size(with_added_tokens=True)
        if hasattr(tok, "__len__"):  # transformers tokenizers: len() counts added tokens, vocab_size not
            return len(tok)
        size = getattr(tok, "vocab_size", None)
        if callable(size):
            size = size()
        if isinstance(size, int):
            return size
        if self.inner is not None:
            return self.inner.get_vocab_size(with_added_tokens=True)
        raise TypeError(f"cannot tell the vocabulary size of {type(tok).__name__}: expected a "
                        "tokenizers.Tokenizer or an object with `vocab_size` or `len()`")

    def texts(self) -> list[str]:
        ids = [[i] for i in range(self.size)]
        if self.inner is not None:
            return self.inner.decode_batch(ids, skip_special_tokens=False)
        try:
            return [self.outer.decode(i, skip_special_tokens=False) for i in ids]
        except TypeError:
            return [self.outer.decode(i) for i in ids]

    def token(self, i: int) -> str | None:
        if self.inner is not None:
            return self.inner.id_to_token(i)
        for name in ("id_to_token", "convert_ids_to_tokens"):
            fn = getattr(self.outer, name, None)
            if fn is not None:
                return fn(i)
        raise TypeError(f"{type(self.outer).__name__} has neither `id_to_token` nor an inner "
                        "tokenizers.Tokenizer at `.tokenizer`; cannot read raw token strings")


def compression_table(tokenizer: Any) -> torch.Tensor:
    """Map every raw token id to its compressed id: `[vocab]` int64 (Engram step 1).

    Each id is decoded alone. A text containing U+FFFD (a partial UTF-8 byte sequence) keys on the
    raw token string; otherwise on `normalize_token_text(text)`. Compressed ids are given in order of
    first appearance scanning raw ids upward. An id that decodes to an empty text (e.g. a special
    token the tokenizer refuses to print) also keys on its raw token string, and an id with no token
    at all gets an id of its own.

    Accepts a `tokenizers.Tokenizer`, a wrapper exposing the inner one at `.tokenizer`, or any object
    with `vocab_size`/`len()`, `decode(ids)` and `id_to_token(id)`.
    """
    view = _TokenizerView(tokenizer)
    keys: dict[object, int] = {}
    table = []
    for i, text in enumerate(view.texts()):
        if "\ufffd" in text or text == "":
            token = view.token(i)
            key: object = token if token is not None else ("<no token>", i)
        else:
            key = normalize_token_text(text)
        table.append(keys.setdefault(key, len(keys)))
    return torch.tensor(table, dtype=torch.long)


# ---------------------------------------------------------------------------------------- hashing
def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (exact for n < 3.3e24)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def engram_primes(config: ModelConfig) -> dict[int, list[list[int]]]:
    """Prime table sizes of every Engram layer: `{layer_id: [order 2..N][head]}`.

    One walk over Engram layers (config order), orders, heads, never reusing a prime: the first head
    of order n takes the smallest unused prime >= `engram_table_sizes[n - 2]`, each further head the
    smallest unused prime above the previous head's.
    """
    used: set[int] = set()
    out: dict[int, list[list[int]]] = {}
    for layer_id in config.engram_layer_ids:
        orders = []
        for size in config.engram_table_sizes:
            heads, candidate = [], size
            for _ in range(config.engram_heads):
                while candidate in used or not _is_prime(candidate):
                    candidate += 1
                heads.append(candidate)
                used.add(candidate)
                candidate += 1
            orders.append(heads)
        out[layer_id] = orders
    return out


def engram_multipliers(config: ModelConfig, layer_id: int, compressed_vocab: int) -> list[int]:
    """The N odd hash multipliers of one layer (drawn with NumPy from `engram_seed + 10007 * layer_id`)."""
    rng = np.random.default_rng(config.engram_seed + 10007 * layer_id)
    half = max(1, (2**63 - 1) // compressed_vocab // 2)
    draws = rng.integers(0, half, size=config.engram_max_ngram)  # int64
    return [int(2 * d + 1) for d in draws]


# ---------------------------------------------------------------------------------------- modules
def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _RMSNorm(RMSNorm):
    """The model's RMSNorm, but computed in float64 for float64 inputs (float32 otherwise)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(_at_least_fp32(x.dtype))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


@dataclass
class EngramState:
    """Decode state of one Engram layer; create it empty, `Engram.forward` fills it.

    Per row it holds the history of the row's real tokens only (padding and rolled-back tokens never
    enter): `ids` the last N-1+keep compressed ids ([B, N-1+keep], the pad id before the sequence
    start) and `conv` the last (w-1)*N+keep conv inputs RMSNorm(v~) ([B, (w-1)*N+keep, D], zeros
    before the start). The `keep` extra positions allow `rollback`; `spare` [B] counts how many of
    them hold real tokens in each row.
    """

    keep: int = 0
    ids: torch.Tensor | None = None  # [B, N-1+keep] int64
    conv: torch.Tensor | None = None  # [B, (w-1)*N+keep, D]
    spare: torch.Tensor | None = None  # [B] int64, <= keep

    @property
    def empty(self) -> bool:
        return self.ids is None

    def reset(self) -> None:
        self.ids = self.conv = self.spare = None

    def rollback(self, num_tokens: int | torch.Tensor) -> None:
        """Forget the last `num_tokens` real tokens of every row (an int, or one count per row [B])."""
        if self.ids is None or self.spare is None:
            if bool(torch.as_tensor(num_tokens).gt(0).any()):
                raise ValueError("cannot roll back an EngramState that has seen no tokens")
            return
        n = torch.as_tensor(num_tokens, dtype=torch.long, device=self.spare.device).expand_as(self.spare)
        if bool(((n < 0) | (n > self.spare)).any()):
            raise ValueError(f"cannot roll back {n.tolist()} tokens: this EngramState(keep={self.keep}) holds "
                             f"{self.spare.tolist()} spare positions per row")
        self.spare = self.spare - n
        self.ids = _drop_last(self.ids, n)
        self.conv = _drop_last(self.conv, n.to(self.conv.device))

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/reorder batch rows (beam search, finished sequences): `index` [B']."""
        if self.ids is not None:
            self.ids = self.ids.index_select(0, index.to(self.ids.device))
            self.spare = self.spare.index_select(0, index.to(self.spare.device))
            self.conv = self.conv.index_select(0, index.to(self.conv.device))

    def _record(self, ids: torch.Tensor, num_new: torch.Tensor | int) -> None:
        """Store the id history [B, N-1+keep] (real entries last) after `num_new` ([B] or int) real tokens."""
        self.ids = ids
        spare = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device) if self.spare is None else self.spare
        self.spare = (spare + num_new).clamp(max=self.keep)


def _drop_last(history: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Shift row b of a right-aligned history [B, L, ...] right by n[b]: its last n[b] entries are gone
    (the first n[b] positions repeat entry 0; they are older than any window reads)."""
    index = (torch.arange(history.shape[1], device=history.device) - n.unsqueeze(1)).clamp(min=0)  # [B, L]
    return history.gather(1, index.view(*index.shape, *[1] * (history.dim() - 2)).expand_as(history))


def _append(history: torch.Tensor, new: torch.Tensor,
            mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Append T new entries [B, T, ...] to a row-wise history [B, P, ...]: returns [B, P+T, ...] and,
    when `mask` [B, T] marks some entries as padding, where each new entry landed.

    Padded entries move in front of everything (out of every window, which only looks back into the
    history); each row's real entries follow its history in order. `where` [B, T] is a real entry's
    index within the last T entries (padded ones point at some real entry: finite, never used).
    """
    full = torch.cat([history, new], dim=1)
    if mask is None:
        return full, None
    P, T = history.shape[1], new.shape[1]
    real = torch.cat([mask.new_ones(mask.shape[0], P), mask], dim=1).to(torch.uint8)
    order = real.argsort(dim=1, stable=True)  # padding first, then history and real entries in order
    full = full.gather(1, order.view(*order.shape, *[1] * (full.dim() - 2)).expand_as(full))
    where = T - mask.sum(dim=1, keepdim=True) + mask.long().cumsum(dim=1) - 1  # in [0, T)
    return full, where


class Engram(nn.Module):
    """Engram conditional memory of one Transformer layer; returns Y to add to the hidden state.

    Parameters: `table` (nn.Embedding of sum(primes) rows x engram_dim_per_ngram/K), `key_proj`,
    `value_proj` (Linear with bias, -> hidden), `hidden_norm`, `key_norm`, `conv_norm` (RMSNorm) and
    `conv` (depthwise Conv1d weight [hidden, 1, w], zero-initialised, no bias). Persistent int64
    buffers: `compression` [vocab_size], `multipliers` [N], `primes` [(N-1)*K], `offsets` [(N-1)*K].
    """

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        if layer_id not in config.engram_layer_ids:
            raise ValueError(f"layer {layer_id} is not in engram_layer_ids {config.engram_layer_ids}")
        self.config = config
        self.layer_id = layer_id
        self.max_ngram = n = config.engram_max_ngram
        self.num_heads = k = config.engram_heads
        self.head_dim = config.engram_dim_per_ngram // k
        self.memory_dim = (n - 1) * config.engram_dim_per_ngram
        self.hidden_size = d = config.hidden_size
        self.kernel = config.engram_kernel
        self.conv_history = (self.kernel - 1) * n
        self._primes = [p for order in engram_primes(config)[layer_id] for p in order]  # [(N-1)*K]
        self._offsets = [sum(self._primes[:i]) for i in range(len(self._primes))]
        self.sparse_grad = False  # F.embedding(sparse=...) for row-sparse optimizers
        self.keep_gate = False  # store alpha [B, T] in `last_gate` on every forward
        self.last_gate: torch.Tensor | None = None
        self._verified = False

        self.table = nn.Embedding(sum(self._primes), self.head_dim)
        self.key_proj = nn.Linear(self.memory_dim, d, bias=True)
        self.value_proj = nn.Linear(self.memory_dim, d, bias=True)
        self.hidden_norm = _RMSNorm(d, config.rms_norm_eps)
        self.key_norm = _RMSNorm(d, config.rms_norm_eps)
        self.conv_norm = _RMSNorm(d, config.rms_norm_eps)
        self.conv = nn.Conv1d(d, d, self.kernel, groups=d, dilation=n, bias=False)
        self.register_buffer("compression", torch.full((config.vocab_size,), -1, dtype=torch.long))
        self.register_buffer("multipliers", torch.zeros(n, dtype=torch.long))
        self.register_buffer("primes", torch.zeros(len(self._primes), dtype=torch.long))
        self.register_buffer("offsets", torch.zeros(len(self._primes), dtype=torch.long))
        self.register_load_state_dict_post_hook(Engram._after_load)
        self.reset_parameters()

    # ------------------------------------------------------------------ init / compression
    def reset_parameters(self) -> None:
        """Initialise weights (normal(initializer_range), zero biases, unit norms, zero conv) and buffers."""
        std = self.config.initializer_range
        with torch.no_grad():
            nn.init.normal_(self.table.weight, std=std)
            for proj in (self.key_proj, self.value_proj):
                nn.init.normal_(proj.weight, std=std)
                nn.init.zeros_(proj.bias)
            for norm in (self.hidden_norm, self.key_norm, self.conv_norm):
                nn.init.ones_(norm.weight)
            nn.init.zeros_(self.conv.weight)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Refill `primes` and `offsets` from the config (after `to_empty`); the compression stays as is."""
        if self.primes.is_meta:
            return
        with torch.no_grad():
            self.primes.copy_(torch.tensor(self._primes, dtype=torch.long))
            self.offsets.copy_(torch.tensor(self._offsets, dtype=torch.long))
        self._verified = False

    def set_compression(self, table: torch.Tensor) -> None:
        """Store the raw->compressed id table (from `compression_table`) and the hash multipliers.

        A table shorter than `vocab_size` (tokenizer smaller than the embedding) maps the extra raw
        ids to the compressed pad id; the compressed vocab size V' is `table.max() + 1`.
        """
        table = torch.as_tensor(table).detach().to("cpu", torch.long)
        vocab = self.config.vocab_size
        if table.dim() != 1 or not 0 < table.numel() <= vocab:
            raise ValueError(f"Engram compression table must be 1-D with 1..vocab_size={vocab} entries, "
                             f"got shape {tuple(table.shape)}")
        if int(table.min()) < 0:
            raise ValueError("Engram compression table has negative ids")
        v_prime = int(table.max()) + 1
        if torch.unique(table).numel() != v_prime:
            raise ValueError(f"Engram compression table must use every id in [0, {v_prime}) (compressed ids "
                             "are dense, assigned in order of first appearance)")
        pad = self.config.engram_pad_token
        if not 0 <= pad < table.numel():
            raise ValueError(f"engram pad token {pad} is outside the compression table "
                             f"({table.numel()} entries); set engram_pad_id")
        full = torch.full((vocab,), int(table[pad]), dtype=torch.long)
        full[: table.numel()] = table
        mult = torch.tensor(engram_multipliers(self.config, self.layer_id, v_prime), dtype=torch.long)
        if self.compression.is_meta:
            raise RuntimeError("set_compression on a meta-device Engram: materialise the model first "
                               "(to_empty + reset_parameters, or load a checkpoint)")
        with torch.no_grad():
            self.compression.copy_(full)
            self.multipliers.copy_(mult)
        self._verified = False  # checked (once) on the next forward

    @property
    def compressed_vocab_size(self) -> int:
        return int(self.compression.max()) + 1

    @staticmethod
    def _after_load(module: nn.Module, incompatible_keys: Any) -> None:
        module._verified = False

    def _buffer_problem(self) -> str | None:
        """Why the id buffers cannot be used (None when they are consistent with the config)."""
        where = f"model.layers.{self.layer_id}.engram"
        if self.primes.tolist() != self._primes or self.offsets.tolist() != self._offsets:
            return (f"Engram layer {self.layer_id}: buffers {where}.primes/offsets do not match this config's "
                    f"engram_* fields (checkpoint written with another config, or a module materialised "
                    f"from the meta device without reset_parameters() or a checkpoint load)")
        comp = self.compression
        v_max = int(comp.max())
        if int(comp.min()) < 0 or v_max >= comp.numel() or self.multipliers.tolist() != engram_multipliers(
                self.config, self.layer_id, v_max + 1):
            return (f"Engram layer {self.layer_id} has no valid tokenizer compression table: call "
                    f"engram.set_compression(compression_table(tokenizer)) or load a checkpoint that "
                    f"contains {where}.compression and {where}.multipliers")
        return None

    def _check_ready(self) -> None:
        if self._verified or self.compression.is_meta:
            return
        problem = self._buffer_problem()
        if problem:
            raise RuntimeError(problem)
        self._verified = True

    # ------------------------------------------------------------------ hashing
    def _rows(self, input_ids: torch.Tensor, state: EngramState | None,
              mask: torch.Tensor | None) -> torch.Tensor:
        """Rows of every head before offsets for the T new tokens: [B, T] raw ids -> [B, T, (N-1)*K].

        Each real token's n-grams reach back over its row's real tokens only (the state's history,
        then the pad id before the start); `mask` [B, T] (True = real) marks padding.
        """
        self._check_ready()
        x = self.compression[input_ids]  # [B, T]
        b, t = x.shape
        ctx = self.max_ngram - 1
        keep = state.keep if state is not None else 0
        if state is not None and state.ids is not None:
            prev = state.ids.to(x.device)
        else:
            prev = self.compression[self.config.engram_pad_token].expand(b, ctx + keep)
        full, where = _append(prev, x, mask)  # [B, ctx + keep + T]
        if state is not None:
            state._record(full[:, full.shape[1] - ctx - keep:], t if mask is None else mask.sum(dim=1))
        rows = self._hash(full[:, full.shape[1] - ctx - t:])  # [B, T, H]
        if where is None:
            return rows
        return rows.gather(1, where.unsqueeze(-1).expand_as(rows))

    def _hash(self, window: torch.Tensor) -> torch.Tensor:
        """[B, N-1+T] compressed ids -> [B, T, (N-1)*K] rows within each head's table."""
        n, ctx = self.max_ngram, self.max_ngram - 1
        t = window.shape[1] - ctx
        primes = self.primes.view(n - 1, self.num_heads)
        mix = window[:, ctx:] * self.multipliers[0]  # int64; x' * m < 2**63 by the choice of m
        rows = []
        for k in range(1, n):
            mix = mix ^ (window[:, ctx - k: ctx - k + t] * self.multipliers[k])  # order k+1
            rows.append(torch.remainder(mix.unsqueeze(-1), primes[k - 1]))  # [B, T, K], >= 0
        return torch.cat(rows, dim=-1)

    def hash_rows(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of every head before offsets: [B, T] raw ids -> [B, T, (N-1)*K] (order 2 heads first)."""
        mask = None if attention_mask is None else attention_mask.to(input_ids.device, torch.bool)
        return self._rows(input_ids, None, mask)

    # ------------------------------------------------------------------ forward
    def lookup(self, input_ids: torch.Tensor, state: EngramState | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Memory vectors e_t [B, T, (N-1)*engram_dim_per_ngram] on the table's device.

        Depends on the tokens only, so it can run ahead of the layer (and of the whole forward) when
        the table lives in host memory: see `seekformer.engram_offload`. The hashing runs where the
        id buffers are (with the table).
        """
        b, t = input_ids.shape
        device = self.compression.device
        input_ids = input_ids.to(device)
        mask = None if attention_mask is None else attention_mask.to(device, torch.bool)
        rows = self._rows(input_ids, state, mask) + self.offsets  # [B, T, H]
        e = F.embedding(rows, self.table.weight, sparse=self.sparse_grad)  # [B, T, H, dh]
        return e.reshape(b, t, self.memory_dim)

    def forward(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        state: EngramState | None = None,
        return_gate: bool = False,
        memory: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, D], raw input_ids [B, T] -> Y [B, T, D] (and alpha [B, T] if `return_gate`).

        With `state`, positions continue the sequence the state has seen (prompt, then tokens).
        `attention_mask` [B, T] (1 = token, 0 = padding) keeps padded positions out of every real
        token's n-grams and conv window, so padding (left, right or holes) changes no real position;
        Y at padded positions is finite and meaningless. `memory` is a prefetched
        `lookup(input_ids, state, attention_mask)`, used instead of looking up again.
        """
        mask = None if attention_mask is None else attention_mask.to(hidden.device, torch.bool)
        if memory is None:
            if input_ids is None:
                raise ValueError("Engram.forward needs input_ids or a prefetched memory")
            memory = self.lookup(input_ids, state, mask)
        e = memory.to(device=hidden.device, non_blocking=True)
        k = self.key_proj(e)  # [B, T, D]
        v = self.value_proj(e)  # [B, T, D]
        alpha = self._gate(hidden, k)  # [B, T] fp32 (fp64 for fp64 inputs)
        v = alpha.unsqueeze(-1).to(v.dtype) * v
        y = v + F.silu(self._causal_conv(self.conv_norm(v), state, mask))
        y = y.to(hidden.dtype)
        if self.keep_gate:
            self.last_gate = alpha.detach()
        return (y, alpha) if return_gate else y

    def _gate(self, hidden: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """alpha = sigmoid(signed_sqrt(<RMSNorm(h), RMSNorm(k)> / sqrt(d))) in >= fp32: [B, T, D] x2 -> [B, T].

        Computed as r_h * r_k * sum(w_h * w_k * h * k) (the two RMSNorms' scales and weights pulled out
        of the dot product), which is the same number with fewer passes over [B, T, D].
        """
        eps = self.config.rms_norm_eps
        dtype = _at_least_fp32(hidden.dtype)
        hf, kf = hidden.to(dtype), k.to(dtype)
        r = torch.rsqrt(hf.square().mean(-1) + eps) * torch.rsqrt(kf.square().mean(-1) + eps)  # [B, T]
        w = self.hidden_norm.weight.to(dtype) * self.key_norm.weight.to(dtype)  # [D]
        score = (hf * w * kf).sum(-1) * r / math.sqrt(self.hidden_size)
        score = score.sign() * score.abs().clamp_min(1e-6).sqrt()
        return torch.sigmoid(score)

    def _causal_conv(self, x: torch.Tensor, state: EngramState | None,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
        """Depthwise conv, kernel w, dilation N, over each row's real positions only: x [B, T, D] -> [B, T, D]."""
        b, t, d = x.shape
        hist = self.conv_history
        keep = state.keep if state is not None else 0
        if state is not None and state.conv is not None:
            prev = state.conv.to(x.dtype)
        else:
            prev = x.new_zeros(b, hist + keep, d)
        full, where = _append(prev, x, mask)  # [B, hist + keep + T, D]
        if state is not None:
            state.conv = full[:, full.shape[1] - hist - keep:]
        xp = full[:, full.shape[1] - hist - t:]  # [B, (w-1)*N + T, D]
        weight = self.conv.weight[:, 0, :].to(x.dtype)  # [D, w]
        out = xp[:, :t] * weight[:, 0]
        for i in range(1, self.kernel):
            out = out.addcmul_(xp[:, i * self.max_ngram: i * self.max_ngram + t], weight[:, i])
        if where is None:
            return out
        return out.gather(1, where.unsqueeze(-1).expand_as(out))
