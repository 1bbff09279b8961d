"""GRPO's log-prob passes with each prompt run once per micro-batch (a shared prefix).

The G completions of a group all continue one prompt. Run as G separate rows, the prompt's tokens
go through every layer G times; here each distinct prompt runs once and its completions attend to
its keys and values. Per layer, the real tokens of the micro-batch make one stream (the distinct
prompts' tokens, then each row's completion inputs) through the norms, projections and MLP/MoE, so
no padding is computed and the routed experts see one batch; only attention is split: each prompt
causally over itself, each completion over [its prompt's keys ; its own keys, causally].

This is the same computation as running every prompt + completion separately (the same tokens, keys,
positions and masks); autograd sums the gradients of a prompt's positions over its completions, as
it would over G copies. A completion's inputs are its tokens but the last (whose hidden state
predicts nothing); its first token is predicted by the prompt's last position.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from ..model.attention import GQAttention, MLAttention, _repeat_heads, attend
from ..model.layers import apply_rope
from ..model.moe import RouterOutput
from ..model.transformer import Transformer
from .cross_entropy import token_logprobs

MAX_SCORES = 1 << 24  # attention scores of the completions' explicit products, per layer (64 MB in float32)


@dataclass
class PrefixBatch:
    """A micro-batch of B rows (prompt + completion), each distinct prompt stored once.

    The stream holds N real tokens: the P distinct prompts' tokens, prompt after prompt, then each
    row's completion inputs. `*_slots` place stream tokens into the padded [P, Lp] prompt and
    [B, Lc] completion layouts the attention runs in (flat indices of the real places, in stream
    order)."""

    tokens: torch.Tensor  # [N] token ids of the stream
    positions: torch.Tensor  # [N] RoPE position of each stream token
    prompt_slots: torch.Tensor  # [Np] flat index into [P, Lp] of each prompt token
    prompt_shape: tuple[int, int]  # (P, Lp)
    prompt_lengths: torch.Tensor  # [P]
    completion_slots: torch.Tensor  # [N - Np] flat index into [B, Lc] of each completion input
    completion_shape: tuple[int, int]  # (B, Lc)
    row_prompt: torch.Tensor  # [B] which prompt each row continues
    rows_of_token: torch.Tensor  # [N] rows each stream token belongs to (a prompt's: the rows continuing it)
    predict: torch.Tensor  # [B, T] stream index of the hidden state that predicts each target (0 on padding)
    targets: torch.Tensor  # [B, T] completion tokens, -100 on padding

    @classmethod
    def build(cls, prompts: list[list[int]], completions: list[list[int]], device: torch.device | str = "cpu",
              width: int | None = None) -> PrefixBatch:
        """The batch of rows prompts[i] + completions[i]; identical prompts are stored once. The
        targets are `width` wide (default: the longest completion)."""
        if len(prompts) != len(completions) or not prompts:
            raise ValueError(f"need one prompt per completion and at least one row, got {len(prompts)} prompts "
                             f"and {len(completions)} completions")
        if any(not p for p in prompts):
            raise ValueError("an empty prompt: every row needs at least one prompt token")
        index: dict[tuple[int, ...], int] = {}
        distinct: list[list[int]] = []
        row_prompt = []
        for p in prompts:
            key = tuple(p)
            if key not in index:
                index[key] = len(distinct)
                distinct.append(p)
            row_prompt.append(index[key])
        P, Lp = len(distinct), max(len(p) for p in distinct)
        B = len(completions)
        inputs = [c[:-1] for c in completions]  # the last token predicts nothing
        Lc = max(len(c) for c in inputs)
        targets = completion_targets(completions, width)
        T = targets.shape[1]
        tokens, positions, prompt_slots, completion_slots = [], [], [], []
        prompt_start = []
        for k, p in enumerate(distinct):
            prompt_start.append(len(tokens))
            tokens += p
            positions += range(len(p))
            prompt_slots += range(k * Lp, k * Lp + len(p))
        uses = [row_prompt.count(k) for k in range(P)]
        rows_of_token = [uses[k] for k, p in enumerate(distinct) for _ in p]
        predict = torch.zeros(B, T, dtype=torch.long)
        for b, (c, x) in enumerate(zip(completions, inputs)):
            p = distinct[row_prompt[b]]
            start = len(tokens)
            tokens += x
            positions += range(len(p), len(p) + len(x))
            completion_slots += range(b * Lc, b * Lc + len(x))
            rows_of_token += [1] * len(x)
            if c:
                predict[b, 0] = prompt_start[row_prompt[b]] + len(p) - 1
                predict[b, 1:len(c)] = torch.arange(start, start + len(x))
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        return cls(as_long(tokens), as_long(positions), as_long(prompt_slots), (P, Lp),
                   as_long([len(p) for p in distinct]), as_long(completion_slots), (B, Lc), as_long(row_prompt),
                   as_long(rows_of_token), predict.to(device), targets.to(device))

    @functools.cached_property
    def completion_mask(self) -> torch.Tensor:
        """[B, 1, Lc, Lp + Lc] (True = may attend): each completion input over its prompt's real tokens
        and, causally, its own; the same in every layer and pass, so built once."""
        (B, Lc), (_, Lp) = self.completion_shape, self.prompt_shape
        device = self.row_prompt.device
        seen = torch.arange(Lp, device=device) < self.prompt_lengths[self.row_prompt].unsqueeze(1)  # [B, Lp]
        causal = torch.ones(Lc, Lc, dtype=torch.bool, device=device).tril()
        return torch.cat((seen[:, None, :].expand(B, Lc, Lp), causal.expand(B, Lc, Lc)), dim=2).unsqueeze(1)

    @property
    def n_prompt_tokens(self) -> int:
        return self.prompt_slots.shape[0]


def completion_targets(completions: list[list[int]], width: int | None = None,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """The completion tokens [B, width] (-100 on padding; width: the longest completion, at least 1)."""
    T = width or max(1, max((len(c) for c in completions), default=0))
    if T < max((len(c) for c in completions), default=0):
        raise ValueError(f"width {T} is narrower than the longest completion")
    targets = torch.full((len(completions), T), -100, dtype=torch.long)
    for row, c in enumerate(completions):
        targets[row, :len(c)] = torch.tensor(c, dtype=torch.long)
    return targets.to(device)


def supports_shared_prefix(model: Transformer) -> bool:
    """Whether `prefix_logprobs` can run `model`: no Engram layers (their n-gram windows read the
    tokens before each one in its row) and no attention dropout (this path runs none)."""
    return not model.engram_layers() and model.config.attention_dropout == 0


def prefix_logprobs(model: Transformer, batch: PrefixBatch, temperature: float = 1.0, entropy: bool = False,
                    routes: dict[str, RouterOutput] | None = None
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(target) [B, T] of every completion token at `temperature` (and the entropies), as
    `token_logprobs` over `model.hidden_states` of each row alone; `routes` collects each MoE
    layer's routing of the stream (by name, as `hidden_states` does), its expert loads counting a
    prompt's tokens once per row that continues it, as if every row had run alone."""
    if not supports_shared_prefix(model):
        raise ValueError("prefix_logprobs: the model has Engram layers or attention dropout, whose rows cannot "
                         "share their prompt; run each row alone (model.hidden_states)")

    def attention(attn, x, cos, sin):
        return _attention(attn, x[0], cos, sin, batch).unsqueeze(0)

    # the stream as one row: norms, projections and MLP/MoE over all its tokens, only attention split
    stream_routes: dict[str, RouterOutput] | None = {} if routes is not None else None
    h = model.hidden_states(batch.tokens.unsqueeze(0), position_ids=batch.positions.unsqueeze(0),
                            routes=stream_routes, attention=attention)[0]
    if routes is not None:
        routes.update({name: _row_loads(route, batch) for name, route in stream_routes.items()})
    return token_logprobs(h[batch.predict], model.lm_head.weight, batch.targets, temperature, entropy=entropy)


def _row_loads(route: RouterOutput, batch: PrefixBatch) -> RouterOutput:
    """`route` with its per-expert counts taken over rows: each prompt token once per row continuing it."""
    k = route.indices.shape[1]
    counts = torch.zeros_like(route.counts).index_add_(0, route.indices.flatten(),
                                                       batch.rows_of_token.repeat_interleave(k))
    return replace(route, counts=counts)


def _attention(attn, x: torch.Tensor, cos, sin, batch: PrefixBatch) -> torch.Tensor:
    """The attention block's output [N, hidden] for the stream's normed inputs x [N, hidden]."""
    q, k, v = _qkv(attn, x, cos, sin)  # [N, H, D], [N, H_kv, D], [N, H_kv, Dv]
    n_prompt = batch.n_prompt_tokens
    P, Lp = batch.prompt_shape
    # each prompt causally over itself: right-padded rows need no mask
    qp, kp, vp = (_to_rows(t[:n_prompt], batch.prompt_slots, P, Lp) for t in (q, k, v))  # [P, H, Lp, D]
    out_prompt = attend(qp, kp, vp, attn.softmax_scale, None)
    outs = [_from_rows(out_prompt, batch.prompt_slots)]
    B, Lc = batch.completion_shape
    if Lc:
        qc, kc, vc = (_to_rows(t[n_prompt:], batch.completion_slots, B, Lc) for t in (q, k, v))
        keys = torch.cat((_per_row(kp, batch.row_prompt), kc), dim=2)  # [B, H_kv, Lp + Lc, D]
        values = torch.cat((_per_row(vp, batch.row_prompt), vc), dim=2)
        out_completion = _masked_attention(qc, keys, values, attn.softmax_scale, batch.completion_mask)
        outs.append(_from_rows(out_completion, batch.completion_slots))
    out = torch.cat(outs) if len(outs) > 1 else outs[0]  # [N, H, Dv]
    return attn.o_proj(out.flatten(1))


def _masked_attention(q, k, v, scale: float, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale, where `mask`) v for q [B, H, T, D], k [B, H_kv, S, D], v [B, H_kv, S, Dv]
    and mask [B, 1, T, S] (True = may attend), as explicit products with a float32 softmax.

    A completion's few dozen queries over its prompt and itself: SDPA's masked CPU kernel took
    ~30 ms per layer for its backward at 32 x 31 queries over 43 keys, these products ~1 ms. Above
    MAX_SCORES scores the memory-bounded SDPA kernel takes over."""
    B, H, T, _ = q.shape
    if B * H * T * k.shape[2] > MAX_SCORES:
        return attend(q, k, v, scale, mask)
    groups = H // k.shape[1]
    if groups > 1:
        k, v = _repeat_heads(k, groups), _repeat_heads(v, groups)
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale).masked_fill_(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


def _qkv(attn, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token queries [N, H, D], keys [N, H_kv, D] and values [N, H_kv, Dv] of x [N, hidden]."""
    N = x.shape[0]
    if isinstance(attn, MLAttention):
        c_kv, k_pe = attn.latent(x.unsqueeze(0), cos, sin)  # [1, N, r], [1, N, d_rope]
        q_nope, q_pe = attn.queries(x.unsqueeze(0), cos, sin)  # [1, N, H, d]
        k_nope, v = attn.expand_latent(c_kv[0])
        k = torch.cat((k_nope, k_pe[0].unsqueeze(1).expand(N, attn.n_heads, attn.rope_dim)), dim=-1)
        return torch.cat((q_nope[0], q_pe[0]), dim=-1), k, v
    if isinstance(attn, GQAttention):
        D = attn.head_dim
        q = apply_rope(attn.q_proj(x).view(1, N, attn.n_heads, D), cos, sin, pairwise=False)[0]
        k = apply_rope(attn.k_proj(x).view(1, N, attn.n_kv_heads, D), cos, sin, pairwise=False)[0]
        return q, k, attn.v_proj(x).view(N, attn.n_kv_heads, D)
    raise TypeError(f"no shared-prefix attention for {type(attn).__name__}")


def _per_row(t: torch.Tensor, row_prompt: torch.Tensor) -> torch.Tensor:
    """t [P, ...] of each row's prompt: [B, ...], as a product with the one-hot [B, P] matrix, whose
    backward sums each prompt's rows in one product (`index_select`'s backward, an index_add, ran
    as a scatter costing ~5 ms per layer on tensors of a few hundred KB)."""
    one_hot = torch.nn.functional.one_hot(row_prompt, t.shape[0]).to(t.dtype)
    return torch.matmul(one_hot, t.reshape(t.shape[0], -1)).view(row_prompt.shape[0], *t.shape[1:])


def _to_rows(t: torch.Tensor, slots: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """Stream tokens t [n, H, D] into the padded layout [rows, H, width, D] (zeros on padding)."""
    padded = t.new_zeros(rows * width, *t.shape[1:]).index_copy_(0, slots, t)  # in place: no second copy
    return padded.view(rows, width, *t.shape[1:]).transpose(1, 2)


def _from_rows(t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The stream's tokens [n, H, D] out of the padded layout t [rows, H, width, D]."""
    return t.transpose(1, 2).flatten(0, 1).index_select(0, slots)
