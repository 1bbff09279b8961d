"""Multi-head Latent Attention (DeepSeek-V2/V3) and MHA/GQA (DeepSeek LLM, DeepSeekMoE).

Shapes: B batch, T new tokens, S keys (cached + new), H query heads, H_kv key/value heads (GQA),
D head dim, d_nope / d_rope / d_v MLA's per-head query-key parts and value dim, r_kv the latent
(kv_lora_rank).

MLA has two computations over the same weights:
- naive (training, prefill): the latent is expanded to per-head keys and values by `kv_b_proj`.
  Causal sequences on CPU attend through blocked matrix products (`blocked_attention.py`) when short,
  or at any length in bf16 without gradients (a prefill);
  the rest through `scaled_dot_product_attention`, with values zero-padded to the query/key head dim
  so SDPA takes its fused kernel (measured 20x faster on CPU than the math fallback that unequal head
  dims force); the padding is sliced off afterwards.
- absorbed (decode, with a `KVCache`): `W_UK` is folded into the query and `W_UV` into the output,
  so every head attends over the cached [c_kv ; k_pe] directly (one shared key per token, as in MQA)
  and nothing is expanded per cached token (bf16 on CPU: two plain products per batch row, see
  `latent_products_attention`). The cache picks the cheaper path per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import bf16_rows
from .blocked_attention import blocked_causal_attention, use_blocked_attention
from .layers import RMSNorm, apply_rope
from .packed_weights import fresh_packs


def build_attention_mask(
    key_padding: torch.Tensor | None, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask [B|1, 1, q_len, kv_len] (True = may attend), or None for plain causal attention
    (q_len == kv_len) or a single query with nothing masked.

    Queries are the last `q_len` of `kv_len` positions. A query whose every allowed key is padding
    (a pad position of a left-padded row) is allowed to see itself, so no softmax row is empty.
    """
    if key_padding is None and q_len in (1, kv_len):
        return None  # SDPA's is_causal, or one query that sees every key
    offset = kv_len - q_len
    q_pos = torch.arange(q_len, device=device).unsqueeze(-1) + offset
    k_pos = torch.arange(kv_len, device=device)
    mask = (k_pos <= q_pos).view(1, 1, q_len, kv_len)
    if key_padding is not None:
        mask = mask & key_padding.bool().view(-1, 1, 1, kv_len)
        mask = mask | (k_pos == q_pos).view(1, 1, q_len, kv_len)
    return mask


def pick_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] at position rows[b] of each row b: [B, 1, ...]."""
    return x[torch.arange(x.shape[0], device=x.device), rows].unsqueeze(1)


def mask_of_rows(mask: torch.Tensor | None, rows: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
    """The [B, 1, 1, kv_len] mask of one query per row, at position rows[b] of the step's q_len new
    queries, cut from the step's mask (None: causal, the queries being the last q_len keys)."""
    B = rows.shape[0]
    if mask is None:
        k_pos = torch.arange(kv_len, device=rows.device)
        return (k_pos <= (rows + kv_len - q_len).unsqueeze(1)).view(B, 1, 1, kv_len)
    mask = mask.expand(B, 1, q_len, kv_len)
    return mask[torch.arange(B, device=rows.device), :, rows].unsqueeze(2)


def attend(q, k, v, scale: float, mask: torch.Tensor | None, dropout: float = 0.0) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k [B, H_kv, S, D] and v [B, H_kv, S, Dv]; mask None means causal
    with T == S (or T == 1: no mask). With H_kv < H (grouped-query attention) each key/value head
    serves H / H_kv consecutive query heads, and is never copied per query head except for the
    blocked path.

    Causal sequences on CPU of up to 1024 tokens, or of any length in bf16 without gradients, run as
    blocked matrix products (`blocked_attention.py`; forward + backward 1.6-2.1x faster there at 512
    tokens, a bf16 prefill's attention 1.8x at 4,096); everything else through SDPA.
    """
    groups = q.shape[1] // k.shape[1]
    if mask is None and use_blocked_attention(q, k, v, dropout):
        if groups > 1:  # training-length sequences: the copy is small next to the attention itself
            k, v = _repeat_heads(k, groups), _repeat_heads(v, groups)
        return blocked_causal_attention(q, k, v, scale)
    if groups > 1 and dropout == 0 and q.shape[-2] < k.shape[-2]:  # a decode or cached step
        return _attend_grouped_rows(q, k, v, scale, mask)
    v_dim = v.shape[-1]
    if v_dim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[-2] > 1, scale=scale, dropout_p=dropout,
        enable_gqa=groups > 1,
    )
    return out[..., :v_dim]


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, S, D] -> [B, H_kv * groups, S, D], each head repeated for its query heads."""
    B, H_kv, S, D = x.shape
    return x.unsqueeze(2).expand(B, H_kv, groups, S, D).reshape(B, H_kv * groups, S, D)


def _attend_grouped_rows(q, k, v, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Grouped-query attention of a decode or cached step: the g = H / H_kv query heads sharing a key
    head attend as g*T rows of that one head (rows ordered (head, t)), so the cache is read once per
    key head and nothing is expanded but the mask (g copies of [T, S]: small while T is; full
    sequences use SDPA's `enable_gqa` instead). For one new token on CPU (H 8-64, H_kv 2-8, 256-4096 cached
    tokens) this measured 1.4x and more faster than SDPA's `enable_gqa`, which is itself faster than
    copying the cache per query head (`benchmarks/gqa_decode.py`)."""
    B, H, T, D = q.shape
    groups = H // k.shape[1]
    rows = q.reshape(B, k.shape[1], groups * T, D)  # [B, H_kv, g*T, D]
    if mask is not None:
        mask = mask.repeat(1, 1, groups, 1)  # [B|1, 1, g*T, S]: each head's rows see their keys
    out = F.scaled_dot_product_attention(rows, k, v, attn_mask=mask, scale=scale)  # [B, H_kv, g*T, Dv]
    return out.reshape(B, H, T, v.shape[-1])


def _row_groups(rows: int, device: torch.device) -> int:
    """Into how many groups the query rows of an absorbed step split (see `MLAttention.absorbed`).

    SDPA's CPU kernel shares work out by (batch, head, block of 32+ query rows): a decode step's
    T*H rows over one latent head make a single item, one thread. Grouping the rows as heads over the
    same (expanded, not copied) latent gives each thread its share (16 heads over 4k cached tokens on
    a loaded 2-core machine: best of 20 calls 27 -> 17 ms). Groups of 32+ rows would already be
    separate items.
    """
    if device.type != "cpu":
        return 1
    return math.gcd(rows, torch.get_num_threads()) if rows < 32 * torch.get_num_threads() else 1


LATENT_PRODUCT_ROWS = 256  # most query rows (T*H) per batch row for `latent_products_attention`


def use_latent_products(q: torch.Tensor, latent: torch.Tensor) -> bool:
    """Whether absorbed attention of q [B, T, H, D] over latent [B, S, D] should run as plain matrix
    products (`latent_products_attention`): bf16 on CPU without gradients, a few query rows (decode,
    speculative verification, a prefill's last token), and a batch small enough or keys many enough
    that its per-row products do not cost more than SDPA's one call (16 heads, quiet 2-core CPU: 1.3-2.1x
    faster at batch 1-8 over 256-4,096 keys, 1.7x at batch 32 over 1,024, 0.87x at batch 32 over 256)."""
    B, T, H, _ = q.shape
    return (latent.device.type == "cpu" and latent.dtype == torch.bfloat16 and q.dtype == torch.bfloat16
            and T * H <= LATENT_PRODUCT_ROWS and (B <= 8 or latent.shape[1] >= 512)
            and not (torch.is_grad_enabled() and (q.requires_grad or latent.requires_grad)))


def latent_products_attention(q: torch.Tensor, latent: torch.Tensor, r: int, scale: float,
                              mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q latent^T * scale) latent[..., :r] for q [B, T, H, D] over latent [B, S, D] -> [B, T, H, r],
    `mask` [B|1, 1, T, S] (True = may attend) or None (every query sees every key).

    Per batch row, a bf16 product for the scores of all T*H queries, one softmax (float32 inside, bf16
    out) and a bf16 product with the values (the latent's first r dims, read in place). On CPU, SDPA's
    fused kernel ran these 16-row decode queries over 4,096 cached tokens at ~2.5 GB/s of latent
    (1.9-2.2 ms per layer); the two products take ~1.2 ms. The scores are rounded to bf16 as they
    leave their product (as in the bf16 prefill, `blocked_attention.py`, and transformers' eager
    attention): about 3x SDPA's error against float64 (tested).
    """
    B, T, H, D = q.shape
    S = latent.shape[1]
    q = (q * scale).reshape(B, T * H, D)
    out = q.new_empty(B, T * H, r)
    for b in range(B):
        scores = torch.mm(q[b], latent[b].t())  # [T*H, S]
        if mask is not None:
            scores.view(T, H, S).masked_fill_(~mask[b if mask.shape[0] > 1 else 0, 0].unsqueeze(1), float("-inf"))
        torch.mm(torch.softmax(scores, dim=-1), latent[b, :, :r], out=out[b])
    return out.view(B, T, H, r)


def _bf16_cpu_inference(x: torch.Tensor) -> bool:
    """bf16 on CPU without autograd: where attention runs the bf16 inference kernels (blocked causal
    attention, latent products), which read strided per-head rows in place."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and not (torch.is_grad_enabled() and x.requires_grad)


def _dense_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer's weight matrix; layers holding FP8 weights (`load_model(..., keep_fp8=True)`)
    dequantise theirs into `dtype`."""
    dequantize = getattr(linear, "dequantized_weight", None)
    return linear.weight if dequantize is None else dequantize(dtype)


class MLAttention(nn.Module):
    """Multi-head Latent Attention; parameter names follow the hub checkpoints."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        self.n_heads = c.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        qk_dim = c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, self.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim,
                                            bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, c.hidden_size, bias=c.attention_bias)
        self.softmax_scale = qk_dim**-0.5 * c.yarn_mscale_all_dim() ** 2
        self.pairwise_rope = c.uses_pairwise_rope
        self._absorbed_weights: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._absorbed_packs: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def queries(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """q_nope [B, T, H, d_nope] and roped q_pe [B, T, H, d_rope]."""
        B, T, _ = x.shape
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin, self.pairwise_rope)

    def latent(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache stores: normalised c_kv [B, T, r_kv] and roped k_pe [B, T, d_rope]."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, self.pairwise_rope).squeeze(2)
        return self.kv_a_layernorm(c_kv), k_pe

    def forward(self, x: torch.Tensor, cos, sin, mask: torch.Tensor | None, cache=None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """rows [B] (optional): attend only from position rows[b] of each row ([B, 1, hidden] out);
        the latent of every position is still made (and cached). A prefill's last layer needs only
        the last token's output, and one query attends over the latent (absorbed) at a fraction of
        the cost of expanding it."""
        T = x.shape[1]
        c_kv, k_pe = self.latent(x, cos, sin)
        if rows is not None:
            S = T + (cache.length if cache is not None else 0)
            mask = mask_of_rows(mask, rows, T, S)
            x, cos, sin = pick_rows(x, rows), pick_rows(cos, rows), pick_rows(sin, rows)
        q_nope, q_pe = self.queries(x, cos, sin)
        if cache is not None:
            latent = cache.update_latent(self.layer_idx, c_kv, k_pe)  # [B, S, r_kv + d_rope]
            if rows is not None or cache.use_absorbed(T, self.nope_dim, self.v_dim):
                return self.absorbed(q_nope, q_pe, latent, mask)
            c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.naive(q_nope, q_pe, c_kv, k_pe, mask)

    def expand_latent(self, c_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys without RoPE [..., S, H, d_nope] and values [..., S, H, d_v] of the latents
        c_kv [..., S, r]: W_UK c and W_UV c, one product with `kv_b_proj`."""
        kv = self.kv_b_proj(c_kv).unflatten(-1, (self.n_heads, self.nope_dim + self.v_dim))
        return kv.split([self.nope_dim, self.v_dim], dim=-1)

    def naive(self, q_nope, q_pe, c_kv, k_pe, mask: torch.Tensor | None) -> torch.Tensor:
        """Expand the latent c_kv [B, S, r] to per-head keys and values, then SDPA."""
        B, T = q_nope.shape[:2]
        S = c_kv.shape[1]
        k_nope, v = self.expand_latent(c_kv)
        if _bf16_cpu_inference(q_nope):
            # in [B, T|S, H, d] order (a plain concatenation, where a transposing one cost 2-3x more),
            # seen as [B, H, T|S, d]: the bf16 attention reads each head's rows in place (strided)
            k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(B, S, self.n_heads, self.rope_dim)), dim=-1).transpose(1, 2)
            q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)
        else:  # straight into [B, H, T|S, d] order: one copy each, and contiguous per head
            k = torch.cat((k_nope.transpose(1, 2), k_pe.unsqueeze(1).expand(B, self.n_heads, S, self.rope_dim)),
                          dim=-1)
            q = torch.cat((q_nope.transpose(1, 2), q_pe.transpose(1, 2)), dim=-1)
        dropout = self.config.attention_dropout if self.training else 0.0
        out = attend(q, k, v.transpose(1, 2), self.softmax_scale, mask, dropout)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, d_nope, r] and W_UV^T [H, r, d_v] of `kv_b_proj`, contiguous: the batched products
        would otherwise copy their strided slices of the weight at every decode step (measured 1.1 ms
        of 1.3 per layer and step at 16 heads, r 512). Kept while the weight is the same unchanged
        tensor (its storage and version counter), unless gradients must flow into it."""
        weight = _dense_weight(self.kv_b_proj, dtype)
        keep = (weight is self.kv_b_proj.weight and not weight.is_inference()
                and not (torch.is_grad_enabled() and weight.requires_grad))
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device) if keep else None
        if key is not None and self._absorbed_weights is not None and self._absorbed_weights[0] == key:
            return self._absorbed_weights[1]
        w = weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        pair = (w[:, : self.nope_dim].contiguous(), w[:, self.nope_dim:].transpose(1, 2).contiguous())
        self._absorbed_weights = (key, pair) if key is not None else None
        return pair

    def drop_weight_copies(self) -> None:
        """Forget the copies of `kv_b_proj`'s weight kept for decoding (`packed_weights.release_packs`)."""
        self._absorbed_weights = self._absorbed_packs = None

    def absorbed_packs(self, q_nope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """W_UK^T [H, r, d_nope] and W_UV [H, d_v, r] packed for `bf16_rows` (one grouped product over
        the heads each, where oneDNN's batched bf16 products cost ~100 us per decode step for a few
        rows), kept while `kv_b_proj`'s weight is unchanged; None where that kernel does not serve
        (not bf16 CPU inference, shapes outside its layout, no kernel here, FP8 weights) or the model's
        weights are not packed (`pack_for_decode`: `generate(pack_weights=False)` packs nothing)."""
        weight = self.kv_b_proj.weight
        if (fresh_packs(weight) is None  # (fresh packs: a bf16 CPU weight, unchanged, no gradient wanted)
                or getattr(self.kv_b_proj, "dequantized_weight", None) is not None
                or not _bf16_cpu_inference(q_nope) or self.kv_lora_rank % 16 or self.v_dim % 16 or self.nope_dim % 2
                or not bf16_rows.available()):
            return None
        key = (weight.data_ptr(), weight._version)
        if self._absorbed_packs is not None and self._absorbed_packs[0] == key:
            return self._absorbed_packs[1]
        w = weight.detach().view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        pair = (bf16_rows.pack(w[:, : self.nope_dim].transpose(1, 2)), bf16_rows.pack(w[:, self.nope_dim:]))
        self._absorbed_packs = (key, pair)
        return pair

    def absorbed(self, q_nope, q_pe, latent: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention over the latent: q~ = W_UK^T q_nope, scores q~.c_j + q_pe.k_pe_j, out = W_UV sum_j p_j c_j.

        All heads share one key per token, so the T*H queries attend as rows of a single head: as
        plain bf16 products on CPU (`latent_products_attention`), with `bf16_rows`' kernels for small
        batches of short rows where they run, else through SDPA (`_latent_sdpa`).
        """
        B, T, H, _ = q_nope.shape
        S, r = latent.shape[1], self.kv_lora_rank
        packs = self.absorbed_packs(q_nope) if B * T <= bf16_rows.MAX_ROWS else None
        heads = q_nope.permute(2, 0, 1, 3).reshape(H * B * T, self.nope_dim)  # rows grouped by head
        if packs is not None:
            per_head = torch.full((H,), B * T, dtype=torch.int64)
            q_lat = bf16_rows.grouped_rows(heads, per_head, packs[0])
        else:
            w_uk, w_uv_t = self.absorbed_weights(q_nope.dtype)  # [H, d_nope, r], [H, r, d_v]
            q_lat = torch.matmul(heads.view(H, B * T, self.nope_dim), w_uk)  # [H, BT, r]
        q_lat = q_lat.view(H, B, T, r).permute(1, 2, 0, 3)  # [B, T, H, r]
        q = torch.cat((q_lat, q_pe.to(q_lat.dtype)), dim=-1).to(latent.dtype)  # [B, T, H, r + d_rope]
        if mask is None and T > 1:
            mask = build_attention_mask(torch.ones(1, S, dtype=torch.bool, device=q.device), T, S, q.device)
        if use_latent_products(q, latent):
            out = latent_products_attention(q, latent, r, self.softmax_scale, mask)  # [B, T, H, r]
        elif (packs is not None and T * H <= LATENT_PRODUCT_ROWS and latent.stride(-1) == 1
              and latent.stride(-2) == latent.shape[-1]):
            out = bf16_rows.latent_attention(q, latent, r, self.softmax_scale, mask)
        else:
            out = self._latent_sdpa(q, latent, mask)
        out = out.permute(2, 0, 1, 3).reshape(H * B * T, r)
        if packs is not None:
            out = bf16_rows.grouped_rows(out, per_head, packs[1])  # [H * BT, d_v]
        else:
            out = torch.matmul(out.view(H, B * T, r), w_uv_t)  # [H, BT, d_v]
        out = out.view(H, B, T, self.v_dim).permute(1, 2, 0, 3).reshape(B, T, H * self.v_dim)
        return self.o_proj(out)

    def _latent_sdpa(self, q: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """`absorbed`'s attention through SDPA's fused kernel: q [B, T, H, r + d_rope] over latent [B, S,
        r + d_rope] -> [B, T, H, r]. The value is the key itself (its first r dims are c_j), which keeps
        SDPA on its fused kernel and costs one extra d_rope of output."""
        B, T, H, D = q.shape
        S, r = latent.shape[1], self.kv_lora_rank
        # rows are (t, h) pairs, t-major, split into `parts` groups that all attend over the same latent
        parts = _row_groups(T * H, latent.device)
        q = q.reshape(B, parts, T * H // parts, D)
        if mask is not None:
            mask = mask.repeat_interleave(H, dim=2).view(mask.shape[0], parts, T * H // parts, S)
        kv = latent.unsqueeze(1).expand(B, parts, S, D)  # no copy: one latent for every group
        out = F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, scale=self.softmax_scale)
        return out[..., :r].reshape(B, T, H, r)


class GQAttention(nn.Module):
    """Multi-head / grouped-query attention of DeepSeek LLM (Llama layout) and DeepSeekMoE."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.attn_head_dim
        bias = c.attention_bias
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=bias)
        self.softmax_scale = self.head_dim**-0.5 * c.yarn_mscale_all_dim() ** 2

    def forward(self, x: torch.Tensor, cos, sin, mask: torch.Tensor | None, cache=None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """rows [B] (optional): attend only from position rows[b] of each row, as `MLAttention`."""
        B, T, _ = x.shape
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin, pairwise=False)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if cache is not None:
            k, v = cache.update_kv(self.layer_idx, k, v)  # [B, S, H_kv, D]: the whole cache
        if rows is not None:
            mask = mask_of_rows(mask, rows, T, k.shape[1])
            x, cos, sin, T = pick_rows(x, rows), pick_rows(cos, rows), pick_rows(sin, rows), 1
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin, pairwise=False)
        dropout = self.config.attention_dropout if self.training else 0.0
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.softmax_scale, mask, dropout)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
