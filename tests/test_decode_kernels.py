"""Fast paths of bf16 CPU prefill and decode (absorbed attention as matrix products, RoPE as complex
products, the cache sized once) against independent oracles: float64, the real-arithmetic formulas."""

import pytest
import torch
import torch.nn.functional as F

from seekformer import ModelConfig, Transformer
from seekformer.inference import KVCache
from seekformer.model import attention
from seekformer.model.attention import build_attention_mask, latent_products_attention, use_latent_products
from seekformer.model.layers import apply_rope


def _latent_reference(q, latent, r, scale, mask):
    """softmax(q latent^T * scale) latent[:, :r] per batch row, in float64: q [B, T, H, D], latent [B, S, D]."""
    scores = torch.einsum("bthd,bsd->bths", q.double(), latent.double()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask.transpose(1, 2), float("-inf"))  # [B|1, T, 1, S]
    return torch.einsum("bths,bsr->bthr", scores.softmax(-1), latent[..., :r].double())


def _sdpa(q, latent, r, scale, mask):
    """The same attention through SDPA's fused kernel in bf16 (each head a row of one query head)."""
    B, T, H, D = q.shape
    rows = q.reshape(B, 1, T * H, D)
    if mask is not None:
        mask = mask.repeat_interleave(H, dim=2)
    kv = latent.unsqueeze(1)
    return F.scaled_dot_product_attention(rows, kv, kv, attn_mask=mask, scale=scale)[..., :r].reshape(B, T, H, r)


@pytest.mark.parametrize("T, padded", [(1, False), (1, True), (3, True)])
def test_latent_products_attention_error_is_of_the_order_of_sdpa_fused_kernel(T, padded):
    """Two rows, 4 heads, 70 cached keys: one decode token, a left-padded row, a 3-token step (causal
    among the new tokens). Against float64 the bf16 products' error (bf16 scores) stays within 3
    times the fused kernel's; a wrong mask, scale or value slice gives errors of the order of the outputs."""
    gen = torch.Generator().manual_seed(T)
    B, H, S, r, D = 2, 4, 70, 32, 40
    q = torch.randn(B, T, H, D, generator=gen) * 2
    latent = torch.randn(B, S, D, generator=gen)
    padding = torch.ones(B, S, dtype=torch.bool)
    if padded:
        padding[1, :11] = False
    mask = build_attention_mask(padding if padded else None, T, S, q.device)
    if mask is None and T > 1:
        mask = build_attention_mask(torch.ones(1, S, dtype=torch.bool), T, S, q.device)
    expected = _latent_reference(q, latent, r, 0.3, mask)
    q16, latent16 = q.bfloat16(), latent.bfloat16()
    with torch.inference_mode():
        assert use_latent_products(q16, latent16)
        ours = latent_products_attention(q16, latent16, r, 0.3, mask)
        fused = _sdpa(q16, latent16, r, 0.3, mask)
    assert ours.shape == (B, T, H, r) and ours.dtype == torch.bfloat16
    mine, theirs = ((got.double() - expected).abs().max().item() for got in (ours, fused))
    assert mine <= 3 * theirs
    assert mine < 0.02 * expected.abs().max().item()


def test_latent_products_only_for_bf16_cpu_inference_of_a_few_rows():
    q, latent = torch.zeros(1, 1, 16, 8, dtype=torch.bfloat16), torch.zeros(1, 5, 8, dtype=torch.bfloat16)
    assert use_latent_products(q, latent)
    assert not use_latent_products(q.float(), latent.float())  # float32: SDPA
    assert not use_latent_products(torch.zeros(1, 17, 16, 8, dtype=torch.bfloat16), latent)  # 272 rows
    assert not use_latent_products(q.requires_grad_(), latent)  # gradients wanted


def test_bf16_model_decode_error_is_that_of_the_sdpa_path(monkeypatch):
    """A bf16 MLA model decoding 4 tokens after a 40-token left-padded batch of 2, its absorbed attention
    as matrix products or forced through SDPA: against the same weights in float64 the errors are alike."""
    config = ModelConfig.preset("tiny-v3")
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():  # scores of a few units: attention that matters
        for layer in model.model.layers:
            for proj in ("q_b_proj", "kv_b_proj"):
                getattr(layer.self_attn, proj).weight.mul_(12)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (2, 40), generator=gen)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :9] = 0
    steps = torch.randint(0, config.vocab_size, (2, 4), generator=gen)
    calls = []
    products = attention.latent_products_attention
    monkeypatch.setattr(attention, "latent_products_attention", lambda *a: calls.append(1) or products(*a))

    def decode(m):
        with torch.inference_mode():
            cache = KVCache.for_model(m, 2, attention_path="absorbed")
            m(ids, attention_mask=mask, cache=cache)
            return torch.cat([m(steps[:, i:i + 1], cache=cache) for i in range(4)], dim=1).double()

    expected = decode(model.double())
    ours = decode(model.bfloat16())
    assert calls  # the products path ran
    monkeypatch.setattr(attention, "use_latent_products", lambda *a: False)
    fused = decode(model)
    error, fused_error = ((got - expected).abs().max().item() for got in (ours, fused))
    assert error <= 2 * fused_error
    assert (ours - fused).abs().max().item() > 0  # the two paths really differ


def test_generate_sizes_the_cache_once(monkeypatch):
    """250 prompt tokens + 20 new ones cross the cache's 256-slot chunk: `generate` reserves room for all
    of them up front, so the layer buffers are never regrown (each growth copies the whole cache)."""
    from seekformer.inference import generate

    config = ModelConfig.preset("tiny-v3")
    model = Transformer(config).eval()
    growths = []
    grow = KVCache._ensure_capacity

    def record(self, needed):
        if needed > self._capacity and any(self._buffers):
            growths.append((self._capacity, needed))
        grow(self, needed)

    monkeypatch.setattr(KVCache, "_ensure_capacity", record)
    ids = torch.randint(0, config.vocab_size, (1, 250), generator=torch.Generator().manual_seed(0))
    out = generate(model, ids, max_new_tokens=20, stop_tokens=[])
    assert len(out.tokens[0]) == 20 and growths == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_pairwise_rope_without_autograd_is_the_real_rotation_bit_for_bit(dtype):
    """DeepSeek's pairwise RoPE without autograd (complex products) equals [x1 cos - x2 sin ; x2 cos + x1 sin]
    over the strided pairs (in the input's dtype promoted to float32 at least), exactly, and so does the
    autograd path's output. The input is a strided slice, as MLA's q_pe is."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 24, generator=gen).to(dtype)[..., 8:]  # [2, 5, 3, 16], not contiguous
    angles = torch.randn(2, 5, 8, generator=gen) * 40
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    expected = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(dtype)
    with torch.inference_mode():
        got = apply_rope(x, cos, sin, pairwise=True)
    assert got.dtype == dtype and torch.equal(got, expected)
    if dtype != torch.bfloat16:
        assert torch.equal(apply_rope(x.requires_grad_(), cos, sin, pairwise=True), expected)


def test_bf16_prefill_reads_queries_and_keys_in_place_with_the_same_result(monkeypatch):
    """A bf16 MLA prefill (300 tokens: several attention blocks, 2 rows, left padding in a second
    chunk over the cache) builds its queries and keys in [B, T, H, d] order and the attention reads each
    head's rows in place: the same hidden states, bit for bit, as with per-head contiguous copies."""
    config = ModelConfig.preset("tiny-v3")
    torch.manual_seed(0)
    model = Transformer(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 300, dtype=torch.long)
    mask[1, :21] = 0

    def prefill():
        with torch.inference_mode():
            cache = KVCache.for_model(model, 2)
            first = model.hidden_states(ids[:, :260], cache=cache)
            return first, model.hidden_states(ids[:, 260:], mask, cache=cache)

    in_place = prefill()
    monkeypatch.setattr(attention, "_bf16_cpu_inference", lambda x: False)
    copied = prefill()
    assert all(torch.equal(a, b) for a, b in zip(in_place, copied))


def test_pairwise_rope_without_autograd_takes_a_contiguous_slice_at_an_odd_offset():
    """MLA's k_pe of a batch-1 decode step is a contiguous slice of the latent projection starting at
    kv_lora_rank, which may be odd: a float32 input is not copied, and a complex view of it must not
    be taken in place (view_as_complex needs an even storage offset). Oracle: the real formula."""
    buf = torch.randn(1, 1, 1, 33 + 16, generator=torch.Generator().manual_seed(1))
    x = buf[..., 33:]  # contiguous, storage offset 33
    angles = torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(2)) * 40
    cos, sin = angles.cos(), angles.sin()
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    expected = torch.cat((x[..., 0::2] * c - x[..., 1::2] * s, x[..., 1::2] * c + x[..., 0::2] * s), dim=-1)
    with torch.inference_mode():
        assert torch.equal(apply_rope(x, cos, sin, pairwise=True), expected)


def test_float32_mla_with_odd_latent_rank_decodes_batch_one():
    """End to end: a float32 MLA model whose kv_lora_rank is odd generates from one prompt, and its
    greedy tokens are those of the uncached forward (argmax of the full-sequence logits)."""
    from seekformer.inference import generate

    config = ModelConfig.preset("tiny-v3", kv_lora_rank=33)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    out = generate(model, ids, max_new_tokens=3, stop_tokens=[])
    with torch.no_grad():
        logits = model(torch.cat((ids, torch.tensor([out.tokens[0]])), dim=1))
    assert out.tokens[0] == logits[0, 4:7].argmax(-1).tolist()


def test_pairwise_rope_without_autograd_in_float32_stays_within_rounding_for_small_rope_dims():
    """With rope dims 4-12 (tiny configs) float32's complex product runs (partly) in its scalar tail,
    which rounds differently from the real formula: by one rounding of the products' sizes at most."""
    for half in (2, 4, 6, 12):
        x = torch.randn(2, 5, 3, 2 * half, generator=torch.Generator().manual_seed(half))
        angles = torch.randn(2, 5, half, generator=torch.Generator().manual_seed(half + 1)) * 40
        cos, sin = angles.cos(), angles.sin()
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        expected = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        size = torch.cat(((x1 * c).abs() + (x2 * s).abs(), (x2 * c).abs() + (x1 * s).abs()), dim=-1)
        with torch.inference_mode():
            got = apply_rope(x, cos, sin, pairwise=True)
        assert ((got - expected).abs() <= torch.finfo(torch.float32).eps * size).all(), half
