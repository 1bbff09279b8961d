"""Speculative decoding with DeepSeek-V3's Multi-Token Prediction modules as the draft model.

Layout (training semantics, V3 §2.2): MTP module m at position i combines h^{m-1}_i (h^0 = the main
model's final-normed hidden state) with the embedding of token t_{i+m} and predicts t_{i+m+1}.

Each module keeps its own `KVCache` on the same slot grid as the main model's cache. After every
verification the modules "catch up" over the verified slots with their true inputs: module 1 pairs
h^0 at slot s with the token that follows it; module m > 1 pairs module m-1's output at the row's
previous slot with it (the same pairing as the training layout, its positions shifted by m-1, which
RoPE does not see). Drafting then runs ahead speculatively:

- draft 1 comes from module 1's output at the last verified position;
- draft j <= D (D modules) from module j, over the j-1 positions it has not seen yet, fed with
  module j-1's outputs and the drafts so far;
- draft j > D reuses module D one position further on, fed with its own previous output and the
  previous draft (as vLLM chains a single MTP module).

Speculative entries are dropped from the module caches after verification and recomputed from the
true inputs in the next catch-up. The main model verifies [pending, d_1..d_k] in one forward pass;
acceptance is exact match for greedy decoding and the speculative-sampling rule otherwise (accept d
with probability min(1, p(d)/q(d)), else sample from max(0, p - q)), so the output distribution is
the model's own.
"""

from __future__ import annotations

import torch

from .cache import KVCache
from .sampling import SamplingParams, probabilities, sample


class MTPDrafter:
    """Drafts `num_draft` tokens per round for a batch with the model's MTP modules."""

    def __init__(self, model, batch: int, num_draft: int, params: SamplingParams,
                 generator: torch.Generator | None) -> None:
        self.model, self.k, self.params, self.generator = model, num_draft, params, generator
        self.depth = min(num_draft, len(model.mtp))  # modules used
        self.caches = [KVCache.for_mtp(model, m, batch) for m in range(1, self.depth + 1)]
        hidden = model.config.hidden_size
        # output of each module at each row's last verified slot, and whether that entry is real
        self.last_h = [torch.zeros(batch, hidden, dtype=model.dtype, device=model.device)
                       for _ in range(self.depth)]
        self.last_valid = [torch.zeros(batch, dtype=torch.bool, device=model.device) for _ in range(self.depth)]
        self.speculative_slots = [0] * self.depth

    # ------------------------------------------------------------------ verified inputs
    def prefill(self, h0: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None, last: torch.Tensor,
                first_token: torch.Tensor, chunk: int | None) -> None:
        """Catch up over the prompt: h0 [B, P, hidden], ids [B, P], `last` [B] the index of each row's
        last real token, which is followed by `first_token` [B]."""
        nxt = torch.cat((ids[:, 1:], ids[:, :1]), dim=1).scatter(1, last.unsqueeze(1), first_token.unsqueeze(1))
        P = ids.shape[1]
        chunk = chunk or P
        for begin in range(0, P, chunk):
            end = min(begin + chunk, P)
            self._catch_up(h0[:, begin:end], nxt[:, begin:end], None if mask is None else mask[:, begin:end])

    def advance(self, h0: torch.Tensor, next_ids: torch.Tensor, valid: torch.Tensor) -> None:
        """After a verification: forget the speculative entries, then catch up over the verified slots
        (h0 [B, n, hidden], the token following each slot [B, n], `valid` [B, n] a prefix per row)."""
        for cache, n in zip(self.caches, self.speculative_slots):
            cache.truncate(n)
        self.speculative_slots = [0] * self.depth
        self._catch_up(h0, next_ids, None if bool(valid.all()) else valid)

    def _catch_up(self, h0: torch.Tensor, next_ids: torch.Tensor, valid: torch.Tensor | None) -> None:
        B, T = next_ids.shape
        rows = torch.arange(B, device=next_ids.device)
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=next_ids.device)
        span = torch.arange(T, device=next_ids.device)
        last = torch.where(valid, span, -1).amax(dim=1)  # last real slot of the block per row
        has = (last >= 0).unsqueeze(1)
        last = last.clamp(min=0)
        h_in, v_in = h0, valid
        for m in range(self.depth):
            mask = None if bool(v_in.all()) else v_in
            out = self.model.mtp_step(m + 1, h_in, next_ids, self.caches[m], attention_mask=mask)
            prev_h, prev_v = self.last_h[m], self.last_valid[m]
            self.last_h[m] = torch.where(has, out[rows, last], prev_h)
            self.last_valid[m] = torch.where(has[:, 0], v_in[rows, last], prev_v)
            if m + 1 < self.depth:  # module m+2 pairs this module's output one real slot earlier
                h_in = torch.cat((prev_h.unsqueeze(1), out[:, :-1]), dim=1)
                v_in = valid & torch.cat((prev_v.unsqueeze(1), v_in[:, :-1]), dim=1)

    # ------------------------------------------------------------------ drafting
    def draft(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draft tokens [B, k] and, when sampling, their draft distributions [B, k, V]."""
        tokens, probs = [], []

        def pick(h: torch.Tensor, module: int) -> None:
            logits = self.model.mtp_logits(h, module)
            if self.params.greedy:
                tokens.append(logits.argmax(dim=-1))
            else:
                q = probabilities(logits, self.params)
                probs.append(q)
                tokens.append(sample(q, self.generator))

        pick(self.last_h[0], 1)
        # per module used so far: its output at the last verified position, then this round's outputs
        outputs = [self.last_h[0].unsqueeze(1)]
        prev = outputs[0]  # the last step's output, [B, 1, hidden]
        for j in range(2, self.k + 1):
            drafted = torch.stack(tokens, dim=1)  # [B, j-1]
            if j <= self.depth:  # module j, first use this round: the j-1 positions it has not seen
                m = j - 1
                out = self.model.mtp_step(j, outputs[m - 1], drafted, self.caches[m])
                self.speculative_slots[m] += j - 1
                outputs.append(torch.cat((self.last_h[m].unsqueeze(1), out), dim=1))
            else:  # chain the deepest module one position further
                m = self.depth - 1
                out = self.model.mtp_step(self.depth, prev, drafted[:, -1:], self.caches[m])
                self.speculative_slots[m] += 1
            prev = out[:, -1:]
            pick(prev[:, 0], m + 1)
        return torch.stack(tokens, dim=1), (torch.stack(probs, dim=1) if probs else None)

    def select(self, index: torch.Tensor) -> None:
        for cache in self.caches:
            cache.select(index)
        self.last_h = [h.index_select(0, index) for h in self.last_h]
        self.last_valid = [v.index_select(0, index) for v in self.last_valid]


def verify(logits: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor | None,
           params: SamplingParams, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept a prefix of the drafts [B, k] given the main model's logits [B, k+1, V] at [pending, drafts].

    Returns the number of accepted drafts a [B] and the token that follows them [B]: the main model's
    choice at slot a (a correction after a rejection, a bonus token when all k were accepted).
    """
    B, k = drafts.shape
    rows = torch.arange(B, device=drafts.device)
    if params.greedy:
        target = logits.argmax(dim=-1)  # [B, k+1]
        accepted = (drafts == target[:, :k]).long().cumprod(dim=1).sum(dim=1)
        return accepted, target[rows, accepted]
    p = probabilities(logits, params)  # [B, k+1, V]
    p_draft = p[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # [B, k]
    q_draft = draft_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    u = torch.rand(B, k, generator=generator, device=drafts.device)
    accepted = (u * q_draft < p_draft).long().cumprod(dim=1).sum(dim=1)
    q_next = torch.cat((draft_probs, torch.zeros_like(draft_probs[:, :1])), dim=1)[rows, accepted]
    p_next = p[rows, accepted]
    residual = (p_next - q_next).clamp(min=0)
    # a rejection has probability 0 where p <= q everywhere; guard the rounding case all the same
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_next)
    return accepted, sample(residual, generator)


def speculative_step(model, cache: KVCache, drafter: MTPDrafter, pending: torch.Tensor, params: SamplingParams,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round: draft k tokens, verify [pending, drafts] in one forward, keep each row's accepted prefix.

    Returns the new tokens [B, k+1] (accepted drafts then the corrected / bonus token), the number of
    accepted drafts a [B] (row b gets a[b]+1 of the new tokens) and the next pending token [B]. The
    cache rolls back per row (`KVCache.invalidate_tail`), so every row keeps its own accepted length.
    """
    drafts, draft_probs = drafter.draft()  # [B, k], [B, k, V] (None when greedy)
    h = model.hidden_states(torch.cat((pending.unsqueeze(1), drafts), dim=1), cache=cache)  # [B, k+1, hidden]
    accepted, last = verify(model.lm_head(h), drafts, draft_probs, params, generator)  # [B], [B]
    k = drafts.shape[1]
    kept = torch.arange(k + 1, device=h.device) <= accepted.unsqueeze(1)  # [B, k+1]: slots each row keeps
    cache.invalidate_tail(kept)
    region = int(accepted.max()) + 1  # slots any row keeps; the rest were dropped from the cache
    new = torch.cat((drafts, last.unsqueeze(1)), dim=1).scatter(1, accepted.unsqueeze(1), last.unsqueeze(1))
    drafter.advance(h[:, :region], new[:, :region], kept[:, :region])
    return new, accepted, last
