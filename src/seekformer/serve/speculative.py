"""MTP speculative decoding inside the engine: one drafted token per greedy row, accepted per row.

Layout as in `inference/speculative.py`: MTP module 1 at position i combines the main model's hidden
state h_i with the embedding of token t_{i+1} and predicts t_{i+2}. Its latents live in the engine's
block pool on the same slot grid as the main model's (position i in the block of position i), so
blocks are allocated and freed once for both.

A round for a sequence whose token t_n is pending (sampled, not yet in the cache):
1. draft: the MTP module runs over its inputs not yet run — (h_{n-1}, t_n), preceded by
   (h_{n-2}, t_{n-1}) when the last round accepted its draft — and its last output drafts d;
2. verify: the main model runs [t_n, d] at positions n, n+1 together with the batch's other decodes;
3. the main model's token at n is taken as usual; if it equals d, the token at n+1 (its argmax) is
   taken too (a bonus), otherwise slot n+1 is simply not counted (nothing to roll back: the next
   write overwrites it).
Every MTP cache entry is written from verified inputs, so the MTP cache never rolls back either.

Each row accepts or rejects on its own: no row waits for the batch's shortest accepted prefix.
Only greedy rows without penalties or log-probs speculate (their output is then exactly the
non-speculative one); the others decode one token per step in the same forward pass.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from .paged_cache import PagedStep
from .scheduler import Sequence as Seq


class MTPSpeculator:
    """Drafts with the model's first MTP module over the engine's block pool."""

    def __init__(self, engine) -> None:
        model = engine.model
        if not len(model.mtp):
            raise ValueError("speculative='mtp' needs a model with Multi-Token Prediction modules, but this "
                             "model has none (num_nextn_predict_layers=0)")
        self.engine, self.model = engine, model

    @staticmethod
    def speculates(seq: Seq) -> bool:
        s = seq.sampling
        return s.greedy and not s.uses_penalties and s.logprobs is None

    def _step(self, seqs: list[Seq], hidden: torch.Tensor, ids: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """MTP module 1 over counts[b] positions of each row (right-padded): hidden [B, T, H], ids [B, T]."""
        engine = self.engine
        rows = torch.tensor([s.row for s in seqs], device=engine.device)
        step = PagedStep(engine.pool, engine.block_tables.index_select(0, rows), [s.mtp_computed for s in seqs],
                         counts, engine.attention_path)
        out = self.model.mtp_step(1, hidden, ids, step)
        for seq, n in zip(seqs, counts):
            seq.mtp_computed += n
        return out

    def catch_up_prompt(self, group: list[tuple[Seq, int]], starts: list[int], hidden: torch.Tensor) -> None:
        """After a prompt chunk: run the MTP module over its positions whose next token is known;
        hidden [B, T, H] is the main model's output over the chunk (rows as in `group`)."""
        picked, counts, ids = [], [], []
        for i, (seq, chunk) in enumerate(group):
            if not self.speculates(seq):
                continue
            # the last position's next token is not sampled yet: it becomes the first draft's input
            n = chunk - 1 if starts[i] + chunk == seq.length else chunk
            if n:
                tokens = seq.tokens
                picked.append(i)
                counts.append(n)
                ids.append(torch.tensor(tokens[starts[i] + 1:starts[i] + 1 + n]))
        if not picked:
            return
        index = torch.tensor(picked, device=hidden.device)
        width = max(counts)
        self._step([group[i][0] for i in picked], hidden.index_select(0, index)[:, :width],
                   pad_sequence(ids, batch_first=True).to(hidden.device), counts)

    def draft(self, seqs: list[Seq]) -> torch.Tensor:
        """One drafted token per sequence [B] (long, on the model's device)."""
        counts = [len(s.mtp_ids) for s in seqs]
        hidden = pad_sequence([s.mtp_hidden for s in seqs], batch_first=True)  # [B, q, H]
        ids = pad_sequence([torch.tensor(s.mtp_ids) for s in seqs], batch_first=True).to(hidden.device)
        out = self._step(seqs, hidden, ids, counts)
        last = out[torch.arange(len(seqs), device=out.device), torch.tensor(counts, device=out.device) - 1]
        self.engine.metrics.drafted += len(seqs)
        return self.model.mtp_logits(last, 1).argmax(dim=-1)
