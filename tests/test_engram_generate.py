"""Engram in batched and speculative decoding: padding changes no row, rows keep their own acceptance."""

import pytest
import torch
from hf_models import VOCAB
from test_generate import _mtp_model, _prompts

from seekformer.inference import KVCache, generate

LENGTHS = (9, 3, 14, 5)
ENGRAM = dict(engram_layer_ids=[0, 2], engram_max_ngram=3, engram_heads=4, engram_dim_per_ngram=32,
              engram_table_size=[101, 211], engram_kernel=3, engram_pad_id=1)


def _engram_model(depth: int = 1, eps: float = 0.3) -> torch.nn.Module:
    """The MTP test model with Engram in layers 0 and 2, as strong as the attention and MLP outputs:
    padding that leaked into an n-gram or the conv history would change tokens, and the MTP drafts
    (which have no Engram) are still accepted about 40 % of the time."""
    model = _mtp_model(eps, depth, **ENGRAM)
    compression = torch.arange(VOCAB) % 200  # ids 200.. share the compressed ids of 0..55
    with torch.no_grad():
        for layer in model.engram_layers():
            layer.engram.set_compression(compression)
            layer.engram.table.weight.normal_(0, 0.1)
            layer.engram.conv.weight.normal_(0, 0.005)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_padded_forward_equals_each_row_alone():
    """Left and right padding (pad id 7: neither generate's pad nor Engram's) change no real position."""
    model = _engram_model(depth=0)
    prompts = _prompts(LENGTHS)
    width = max(LENGTHS)
    with torch.no_grad():
        alone = [model(torch.tensor([p]))[0] for p in prompts]
        for left in (True, False):
            ids = torch.full((len(prompts), width), 7)
            mask = torch.zeros(len(prompts), width, dtype=torch.long)
            for i, p in enumerate(prompts):
                cols = slice(width - len(p), width) if left else slice(0, len(p))
                ids[i, cols], mask[i, cols] = torch.tensor(p), 1
            logits = model(ids, attention_mask=mask)
            for i in range(len(prompts)):
                real = logits[i][mask[i].bool()]
                assert _rel(real, alone[i]) <= 1e-5, (left, i)


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_batched_generation_equals_each_row_alone(speculative, one_thread):
    model = _engram_model()
    prompts = _prompts(LENGTHS)
    kwargs = dict(max_new_tokens=16, speculative=speculative, num_draft_tokens=2 if speculative else None)
    alone = [generate(model, p, **kwargs).tokens[0] for p in prompts]
    assert generate(model, prompts, **kwargs).tokens == alone
    width = max(LENGTHS)
    ids = torch.tensor([[7] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    assert generate(model, ids, attention_mask=mask, **kwargs).tokens == alone


def test_speculative_rows_keep_their_own_accepted_length(one_thread):
    """Batched MTP decoding with Engram accepts, row for row, what each row accepts alone (the cache and
    the Engram state roll back per row), and greedy output stays the plain greedy output."""
    model = _engram_model()
    prompts = _prompts(LENGTHS)
    kwargs = dict(max_new_tokens=20, speculative="mtp", num_draft_tokens=3)
    fast = generate(model, prompts, **kwargs)
    assert fast.tokens == generate(model, prompts, max_new_tokens=20).tokens
    alone = [generate(model, p, **kwargs).stats for p in prompts]
    assert fast.stats.drafted == sum(s.drafted for s in alone)
    assert fast.stats.accepted_per_depth == [sum(c) for c in zip(*(s.accepted_per_depth for s in alone))]
    assert fast.stats.decode_steps == max(s.decode_steps for s in alone)
    rates = [s.acceptance_rate for s in alone]
    assert 0.3 < fast.stats.acceptance_rate < 1 and max(rates) - min(rates) > 0.05  # rows differ


def test_cache_holes_with_engram_equal_never_feeding():
    """Per-row rollback (`invalidate_tail`) and `truncate` of a cache holding Engram state."""
    model = _engram_model(depth=0)
    gen = torch.Generator().manual_seed(3)
    prompt, extra, after = (torch.randint(2, VOCAB, (2, n), generator=gen) for n in (10, 4, 3))
    with torch.no_grad():
        cache = KVCache.for_model(model, 2)
        cache.max_rollback = 4
        model(prompt, cache=cache)
        model(extra, cache=cache)
        cache.invalidate_tail(torch.tensor([[True, True, False, False], [True, False, False, False]]))
        got = model(after, cache=cache)
        for row, kept in ((0, 2), (1, 1)):
            seq = torch.cat((prompt[row], extra[row, :kept], after[row])).unsqueeze(0)
            assert _rel(got[row], model(seq)[0, -3:]) <= 1e-5
        cache.truncate(3)
        again = model(after, cache=cache)
    assert _rel(again, got) <= 1e-5
