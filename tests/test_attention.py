"""Grouped-query attention without per-head copies of keys and values, against float64 math."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seekformer.model import blocked_attention
from seekformer.model.attention import attend, build_attention_mask


def _reference(q, k, v, scale, mask):
    """Each query head against its key/value head (h // groups), copied per head, in float64."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) * scale
    T, S = q.shape[-2], k.shape[-2]
    if mask is None:
        mask = build_attention_mask(None, T, S, q.device) if T not in (1, S) else None
        if T == S > 1:
            mask = torch.ones(T, S, dtype=torch.bool).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1) @ v


def _qkv(T, S, heads=8, kv_heads=2, dim=16, batch=2):
    gen = torch.Generator().manual_seed(T * 1000 + S)
    return (torch.randn(batch, heads, T, dim, generator=gen), torch.randn(batch, kv_heads, S, dim, generator=gen),
            torch.randn(batch, kv_heads, S, dim, generator=gen))


@pytest.mark.parametrize("path", ["decode", "cached-step-padded", "causal-blocked", "causal-sdpa"])
def test_grouped_query_attention_equals_per_head_copies(monkeypatch, path):
    T, S = {"decode": (1, 37), "cached-step-padded": (4, 40)}.get(path, (50, 50))
    q, k, v = _qkv(T, S)
    mask = None
    if path == "cached-step-padded":  # row 1 left-padded by 9 keys, 4 new tokens after 36 cached ones
        padding = torch.ones(2, S, dtype=torch.bool)
        padding[1, :9] = False
        mask = build_attention_mask(padding, T, S, q.device)
    if path == "causal-sdpa":
        monkeypatch.setattr(blocked_attention, "MAX_TOKENS", 0)
    got = attend(q, k, v, 0.25, mask)
    expected = _reference(q, k, v, 0.25, mask)
    assert got.shape == (2, 8, T, 16)
    assert (got.double() - expected).abs().max() <= 1e-6 * expected.abs().max()


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any operation writes to new memory (views of its inputs aside)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("new_tokens", [1, 3])
def test_decode_reads_the_cache_without_copying_it_per_query_head(new_tokens):
    """A GQA decode step (8 query heads, 2 key/value heads) over 600 cached tokens: no operation may
    produce a tensor the size of the keys repeated for every query head (the old per-step copy)."""
    from seekformer import ModelConfig, Transformer
    from seekformer.inference import KVCache

    config = ModelConfig.preset("tiny-llm", num_hidden_layers=1)
    model = Transformer(config).eval()
    cache = KVCache.for_model(model, 2)
    ids = torch.randint(0, config.vocab_size, (2, 600), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, cache=cache)
        with _LargestOutput() as record:
            model(ids[:, :new_tokens], cache=cache)
    per_head_copy = 2 * (600 + new_tokens) * config.num_attention_heads * config.attn_head_dim
    assert record.largest < per_head_copy / 2


def test_rope_positions_count_real_tokens_only():
    """The one formula the model (no cache) and the decode cache share, on hand-computed rows."""
    from seekformer.model.layers import rope_positions

    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])  # left-padded, right-padded
    got = rope_positions(mask, torch.tensor([[0], [7]]), 5)
    assert got.tolist() == [[0, 0, 0, 1, 2], [7, 8, 9, 9, 9]]
    assert rope_positions(None, torch.tensor([[3], [0]]), 3).tolist() == [[3, 4, 5], [0, 1, 2]]
