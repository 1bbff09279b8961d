"""The decode cache and the absorbed MLA path against the uncached naive forward (float32)."""

import pytest
import torch
from conftest import randomize_norms_and_bias
from hf_models import V3_BASE, VOCAB, hf_model
from test_parity import YARN

from seekformer import ModelConfig, Transformer, load_model
from seekformer.inference import KVCache
from seekformer.model.attention import MLAttention

REL = 1e-5


def _model(tmp_path, kind, **overrides):
    reference = hf_model(kind, **overrides)
    randomize_norms_and_bias(reference)
    reference.save_pretrained(tmp_path)
    return load_model(tmp_path)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _incremental(model, ids, cache, splits):
    """Logits of ids fed through `cache` in pieces ending at each of `splits`, then one token at a time."""
    outs, start = [], 0
    for end in [*splits, *range(splits[-1] + 1, ids.shape[1] + 1)]:
        outs.append(model(ids[:, start:end], cache=cache))
        start = end
    return torch.cat(outs, dim=1)


CASES = {"v3": ("v3", {}), "v3-yarn-no-qlora": ("v3", {"rope_parameters": YARN, "q_lora_rank": None}),
         "v2": ("v2", {}), "llama-gqa": ("llama", {})}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("path", ["naive", "absorbed", "auto"])
def test_chunked_prefill_and_decode_match_full_forward(tmp_path, case, path):
    kind, overrides = CASES[case]
    model = _model(tmp_path, kind, **overrides)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 2, attention_path=path, chunk=8)
        got = _incremental(model, ids, cache, [13, 29])
    assert _rel(got, full) <= REL
    assert cache.length == 40 and cache.num_tokens.tolist() == [40, 40]


def test_absorbed_path_is_used_for_decode_and_equals_naive(tmp_path, monkeypatch):
    model = _model(tmp_path, "v3")
    calls = []
    original = MLAttention.absorbed
    monkeypatch.setattr(MLAttention, "absorbed", lambda self, *a: calls.append(a[0].shape[1]) or original(self, *a))
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        caches = {p: KVCache.for_model(model, 3, attention_path=p) for p in ("auto", "naive")}
        logits = {p: _incremental(model, ids, c, [16]) for p, c in caches.items()}
    layers = model.config.num_hidden_layers
    assert calls == [1] * (8 * layers)  # auto: prefill naive, every single-token step absorbed
    assert _rel(logits["auto"], logits["naive"]) <= REL


def test_left_padded_decode_matches_each_row_alone(tmp_path):
    model = _model(tmp_path, "v3")
    gen = torch.Generator().manual_seed(2)
    long, short = torch.randint(2, VOCAB, (20,), generator=gen), torch.randint(2, VOCAB, (11,), generator=gen)
    steps = torch.randint(2, VOCAB, (2, 6), generator=gen)
    ids = torch.zeros(2, 20, dtype=torch.long)
    ids[0], ids[1, 9:] = long, short
    mask = torch.zeros(2, 20, dtype=torch.long)
    mask[0], mask[1, 9:] = 1, 1
    with torch.no_grad():
        cache = KVCache.for_model(model, 2)
        model(ids, attention_mask=mask, cache=cache)
        batched = torch.cat([model(steps[:, i:i + 1], cache=cache) for i in range(6)], dim=1)
        alone = [model(torch.cat((p, s)).unsqueeze(0))[0, -6:] for p, s in ((long, steps[0]), (short, steps[1]))]
    assert cache.num_tokens.tolist() == [26, 17]
    for row in range(2):
        assert _rel(batched[row], alone[row]) <= REL


def test_rollback_and_holes(tmp_path):
    """Dropping slots (truncate) or hiding them in one row (invalidate_tail) equals never feeding them."""
    model = _model(tmp_path, "v3")
    gen = torch.Generator().manual_seed(3)
    prompt, extra, after = (torch.randint(2, VOCAB, (2, n), generator=gen) for n in (10, 4, 3))
    with torch.no_grad():
        cache = KVCache.for_model(model, 2, chunk=4)
        model(prompt, cache=cache)
        model(extra, cache=cache)
        # row 0 keeps the first 2 extra tokens, row 1 only the first: slots 2-3 are dropped, slot 1 is a hole
        cache.invalidate_tail(torch.tensor([[True, True, False, False], [True, False, False, False]]))
        assert cache.length == 12 and cache.num_tokens.tolist() == [12, 11]
        got = model(after, cache=cache)
        for row, kept in ((0, 2), (1, 1)):
            seq = torch.cat((prompt[row], extra[row, :kept], after[row])).unsqueeze(0)
            assert _rel(got[row], model(seq)[0, -3:]) <= REL
        cache.truncate(3)
        assert cache.length == 12 and cache.num_tokens.tolist() == [12, 11]
        again = model(after, cache=cache)
    assert _rel(again, got) <= REL


def test_select_rows(tmp_path):
    model = _model(tmp_path, "v2")
    ids = torch.randint(2, VOCAB, (3, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = KVCache.for_model(model, 3)
        model(ids[:, :11], cache=cache)
        cache.select(torch.tensor([2, 0]))
        got = model(ids[[2, 0], 11:], cache=cache)
        expected = model(ids[[2, 0]])[:, -1:]
    assert _rel(got, expected) <= REL


def test_cache_grows_in_chunks_stores_only_the_latent_and_follows_the_dtype():
    config = ModelConfig.from_hf({"model_type": "deepseek_v3", **V3_BASE, "max_position_embeddings": 100000})
    model = Transformer(config).to(torch.bfloat16).eval()
    cache = KVCache.for_model(model, 2, chunk=16)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, 20)), cache=cache)
        assert cache._capacity == 32  # two chunks, not max_position_embeddings
        for _ in range(13):
            model(torch.randint(0, VOCAB, (2, 1)), cache=cache)
    per_token = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 2
    assert cache.bytes_per_token() == per_token
    assert cache._capacity == 48 and cache.nbytes() == 2 * 48 * per_token
    assert {b.dtype for layer in cache._buffers for b in layer} == {torch.bfloat16}
    assert KVCache.for_model(model, 1).dtype == torch.bfloat16


def test_cache_errors():
    config = ModelConfig.from_hf({"model_type": "deepseek_v3", **V3_BASE})
    with pytest.raises(ValueError, match="attention_path"):
        KVCache(config, 1, attention_path="fast")
    cache = KVCache(config, 2)
    with pytest.raises(ValueError, match="batch 2"):
        cache.update_latent(0, torch.zeros(3, 1, 16), torch.zeros(3, 1, 8))
    with pytest.raises(KeyError, match="layer 7"):
        cache.update_latent(7, torch.zeros(2, 1, 16), torch.zeros(2, 1, 8))
    with pytest.raises(ValueError, match="cannot drop"):
        cache.truncate(1)


@pytest.mark.parametrize("case", ["v3", "llama-gqa"])
def test_prefill_of_chosen_rows_matches_full_hidden_states(tmp_path, case):
    """`hidden_states(rows=...)` (the last layer from one position per row, as `generate`'s prefill runs)
    equals the full forward at those positions in float64, with left padding, a second chunk over a
    cache and no cache; and the cache it leaves decodes the same."""
    kind, overrides = CASES[case]
    model = _model(tmp_path, kind, **overrides).double()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (2, 24), generator=gen)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :7] = 0
    rows = torch.tensor([9, 5])  # positions inside the second chunk (tokens 14..23)
    step = torch.randint(2, VOCAB, (2, 1), generator=gen)
    with torch.no_grad():
        full_cache, cache = KVCache.for_model(model, 2), KVCache.for_model(model, 2)
        model.hidden_states(ids[:, :14], mask[:, :14], cache=full_cache)
        model.hidden_states(ids[:, :14], mask[:, :14], cache=cache, rows=torch.tensor([13, 13]))
        full = model.hidden_states(ids[:, 14:], mask[:, 14:], cache=full_cache)
        got = model.hidden_states(ids[:, 14:], mask[:, 14:], cache=cache, rows=rows)
        assert got.shape == (2, 1, full.shape[-1])
        assert _rel(got[:, 0], full[torch.arange(2), rows]) <= 1e-12
        assert _rel(model(step, cache=cache), model(step, cache=full_cache)) <= 1e-12
        uncached = model.hidden_states(ids, mask, rows=rows + 14)
        assert _rel(uncached[:, 0], model.hidden_states(ids, mask)[torch.arange(2), rows + 14]) <= 1e-12


@pytest.mark.parametrize("threads", [1, 2, 4, 6])
def test_absorbed_rows_split_over_threads_match_each_row_alone(tmp_path, threads):
    """The absorbed path splits its T*H query rows into gcd(rows, threads) groups over one latent
    (4 heads: 1, 2, 4, 2 groups for one token; 3-token steps: 1, 2, 4, 6): with a left-padded row,
    single and multi-token steps still give each row's uncached logits."""
    model = _model(tmp_path, "v3")
    gen = torch.Generator().manual_seed(5)
    long, short = torch.randint(2, VOCAB, (14,), generator=gen), torch.randint(2, VOCAB, (9,), generator=gen)
    steps = torch.randint(2, VOCAB, (2, 4), generator=gen)
    ids, mask = torch.zeros(2, 14, dtype=torch.long), torch.zeros(2, 14, dtype=torch.long)
    ids[0], ids[1, 5:], mask[0], mask[1, 5:] = long, short, 1, 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            cache = KVCache.for_model(model, 2, attention_path="absorbed")
            model(ids, attention_mask=mask, cache=cache)
            got = torch.cat((model(steps[:, :1], cache=cache), model(steps[:, 1:], cache=cache)), dim=1)
    finally:
        torch.set_num_threads(before)
    with torch.no_grad():
        for row, prompt in ((0, long), (1, short)):
            alone = model(torch.cat((prompt, steps[row])).unsqueeze(0))[0, -4:]
            assert _rel(got[row], alone) <= REL


def test_absorbed_weights_follow_changes_to_the_weight(tmp_path):
    """The contiguous W_UK / W_UV kept between decode steps are remade when kv_b_proj's weight is
    changed in place or replaced, and are not kept when gradients must reach the weight."""
    model = _model(tmp_path, "v3")
    ids = torch.randint(2, VOCAB, (1, 12), generator=torch.Generator().manual_seed(6))

    def decode_vs_full():
        with torch.no_grad():
            cache = KVCache.for_model(model, 1, attention_path="absorbed")
            model(ids[:, :11], cache=cache)
            return _rel(model(ids[:, 11:], cache=cache)[0, -1], model(ids)[0, -1])

    assert decode_vs_full() <= REL
    attention = model.model.layers[1].self_attn
    with torch.no_grad():
        attention.kv_b_proj.weight.mul_(1.5)
    assert decode_vs_full() <= REL
    attention.kv_b_proj.weight = torch.nn.Parameter(torch.randn_like(attention.kv_b_proj.weight) * 0.1)
    assert decode_vs_full() <= REL
    w_uk, _ = attention.absorbed_weights(torch.float32)
    w_uk.sum().backward()  # made with gradients on: a fresh product of the weight, not a kept copy
    assert attention.kv_b_proj.weight.grad is not None and attention._absorbed_weights is None
