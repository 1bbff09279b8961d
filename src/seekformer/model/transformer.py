"""Block, Multi-Token Prediction layers and the Transformer: one module for every DeepSeek config."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import checkpoint_config, keep_fp8_layers, load_state_into, save_pretrained
from ..config import ModelConfig
from .attention import GQAttention, MLAttention, build_attention_mask, pick_rows
from .engram import Engram, EngramState, compression_table
from .layers import MLP, RMSNorm, RotaryEmbedding, rope_positions
from .moe import Experts, MoE, Router, RouterOutput


class Block(nn.Module):
    """Pre-norm decoder layer: (Engram memory,) attention, then dense MLP or MoE (hub names throughout)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        attention = MLAttention if config.is_mla else GQAttention
        self.self_attn = attention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp: nn.Module = MoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.engram = Engram(config, layer_idx) if layer_idx in config.engram_layer_ids else None

    def forward(self, h: torch.Tensor, cos, sin, mask, cache=None, input_ids=None, token_mask=None,
                rows: torch.Tensor | None = None, attention=None) -> tuple[torch.Tensor, RouterOutput | None]:
        """(hidden states out, the MoE layer's routing or None for a dense MLP).

        `token_mask` [B, T] (None: all real) marks which new positions are real tokens (for Engram).
        `rows` [B] (optional): only position rows[b] of each row is wanted: [B, 1, hidden] out (the
        keys and values of every position still go to the cache). `attention` (optional) replaces
        the attention call: `attention(self.self_attn, normed h, cos, sin)` (GRPO's shared-prompt
        passes, `training/grpo_prefix.py`)."""
        if self.engram is not None:
            h = h + self.engram(h, input_ids, self.engram_state(cache), attention_mask=token_mask)
        if attention is not None:
            h = h + attention(self.self_attn, self.input_layernorm(h), cos, sin)
        elif rows is None:
            h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        else:
            h = pick_rows(h, rows) + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, rows=rows)
        if isinstance(self.mlp, MoE):
            out, route = self.mlp(self.post_attention_layernorm(h))
            return h + out, route
        return h + self.mlp(self.post_attention_layernorm(h)), None

    def engram_state(self, cache) -> EngramState | None:
        """This layer's Engram decode state inside `cache` (kept for speculative rollbacks)."""
        if cache is None or self.engram is None:
            return None
        return cache.extra(self.layer_idx, lambda: EngramState(keep=cache.max_rollback))


class SharedHead(nn.Module):
    """The MTP module's own final norm; its output head is the main model's `lm_head`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(Block):
    """DeepSeek-V3 Multi-Token Prediction module k (hub key prefix `model.layers.{L+k-1}`).

    h'_k = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_{k-1})]) (embedding first, as the released weights
    expect), then a full decoder block; logits = lm_head(shared_head.norm(h_k)).
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos, sin, mask,
                cache=None) -> tuple[torch.Tensor, RouterOutput | None]:
        h = self.eh_proj(torch.cat((self.enorm(emb_next), self.hnorm(h_prev)), dim=-1))
        return super().forward(h, cos, sin, mask, cache)


class DecoderModel(nn.Module):
    """Embedding, decoder layers and final norm: the hub's `model.*` prefix."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)


class Transformer(nn.Module):
    """A DeepSeek-family causal language model built from one `ModelConfig`.

    `model(input_ids)` returns logits [B, T, vocab]; with `attention_mask` [B, T] (1 = token,
    0 = padding) left- or right-padded batches work, positions counting real tokens only.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        first_mtp = config.num_hidden_layers
        self.mtp = nn.ModuleList(MTPLayer(config, first_mtp + k) for k in range(config.num_nextn_predict_layers))
        self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, Engram, Router, Experts)):
                module.reset_parameters()  # Engram: zero conv, id buffers (its children follow)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after `to_empty` from the meta device)."""
        self.model.rotary.reset_buffers()
        for module in self.modules():
            if isinstance(module, Engram):
                module.reset_buffers()

    # ------------------------------------------------------------------ Engram
    def engram_layers(self) -> list[Block]:
        return [layer for layer in self.model.layers if layer.engram is not None]

    def set_engram_tokenizer(self, tokenizer) -> None:
        """Build the tokenizer compression table once and store it in every Engram layer (it is
        saved with the checkpoint, so a loaded model needs no tokenizer for this)."""
        if not self.engram_layers():
            raise ValueError("this model has no Engram layers (engram_layer_ids is empty)")
        table = compression_table(tokenizer)
        for layer in self.engram_layers():
            layer.engram.set_compression(table)

    # ------------------------------------------------------------------ forward
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        document_ids: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        routes: dict[str, RouterOutput] | None = None,
        attention=None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, T, hidden] (h_0 of Multi-Token Prediction).

        With a `cache` (`seekformer.inference.KVCache`) the tokens continue the cached ones:
        `attention_mask` then marks which of the T new tokens are real ([B, T], or [B, past + T]
        whose last T columns are used) and positions count each row's real tokens.
        `document_ids` [B, T] packs several sequences per row (training): a token attends only to the
        earlier tokens with its id, and positions restart at each new id.
        `rows` [B] (optional): only the hidden state at position rows[b] of each row is wanted
        ([B, 1, hidden] out): the last layer then attends and runs its MLP from those positions only
        (a prompt's prefill needs just its last token's; the cache still gets every position).
        `routes` (optional): filled with the routing each MoE layer returned, by name (`layers.{i}`):
        the expert loads and affinities of this forward, for load balancing.
        `attention` (optional) replaces every layer's attention call (`Block.forward`).
        """
        self._check_input(input_ids, attention_mask)
        T = input_ids.shape[1]
        if document_ids is not None:
            mask, cos, sin = self._packed_attention_inputs(input_ids, document_ids, attention_mask, cache)
            token_mask = None
        else:
            mask, cos, sin, token_mask = self._attention_inputs(input_ids, attention_mask, position_ids, cache)
        h = self.model.embed_tokens(input_ids)
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            # by keyword: hooks applied to a built model (engram_offload) read them
            extra = {"rows": rows} if rows is not None and i == last else {}
            if attention is not None:
                extra["attention"] = attention
            h, route = layer(h, cos, sin, mask, cache=cache, input_ids=input_ids, token_mask=token_mask, **extra)
            if routes is not None and route is not None:
                routes[f"layers.{i}"] = route
        if rows is not None and last < 0:
            h = pick_rows(h, rows)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(h)

    def _attention_inputs(self, input_ids, attention_mask, position_ids, cache):
        """The attention mask shared by all layers, the RoPE cos/sin of the step and which of the new
        positions are real tokens ([B, T], None when all are)."""
        B, T = input_ids.shape
        if cache is None:
            if position_ids is None:
                position_ids = rope_positions(attention_mask, input_ids.new_zeros(B, 1, dtype=torch.long), T)
            key_padding = attention_mask
            if key_padding is not None and bool(key_padding.all()):
                key_padding = None  # nothing padded: plain causal attention takes the fused kernel
            past_len = 0
            token_mask = key_padding
        else:
            past_len = cache.length
            new_mask = attention_mask[:, -T:] if attention_mask is not None else None
            if position_ids is None:
                position_ids = cache.positions(new_mask, T)
            key_padding = cache.key_padding(new_mask, T)
            token_mask = cache.new_valid
        mask = build_attention_mask(key_padding, T, past_len + T, input_ids.device)
        cos, sin = self.model.rotary(position_ids)
        return mask, cos, sin, token_mask

    def _packed_attention_inputs(self, input_ids, document_ids, attention_mask, cache):
        """Block-diagonal causal mask [B, 1, T, T] and per-document RoPE positions of packed rows."""
        if cache is not None or attention_mask is not None:
            raise ValueError("document_ids (packed sequences) cannot be combined with a cache or an attention_mask")
        if document_ids.shape != input_ids.shape:
            raise ValueError(f"document_ids {tuple(document_ids.shape)} must have input_ids' shape "
                             f"{tuple(input_ids.shape)}")
        if self.engram_layers():
            raise ValueError("packed sequences are not supported with Engram layers: their n-gram and "
                             "convolution windows would cross the sequence boundaries")
        T = input_ids.shape[1]
        index = torch.arange(T, device=input_ids.device).expand_as(document_ids)
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        position_ids = index - torch.where(starts, index, 0).cummax(dim=-1).values
        causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
        mask = (causal & (document_ids[:, :, None] == document_ids[:, None, :])).unsqueeze(1)
        cos, sin = self.model.rotary(position_ids)
        return mask, cos, sin

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache))

    def mtp_hidden_states(
        self, h: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
        routes: dict[str, RouterOutput] | None = None,
    ) -> list[torch.Tensor]:
        """Hidden states of each MTP depth k (training layout, no cache).

        Depth k at position i combines h_{k-1} at i with the embedding of token i+k and predicts
        token i+k+1; it is valid for i < T-k, so the k-th output has T-k positions. `routes` as in
        `hidden_states` (names `mtp.{k-1}`).
        """
        if not self.mtp:
            raise ValueError("this model has no Multi-Token Prediction layers (num_nextn_predict_layers=0)")
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        emb = self.model.embed_tokens(input_ids)
        outs = []
        for k, layer in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            cos, sin = self.model.rotary(position_ids[:, : T - k])
            h, route = layer(h[:, : T - k], emb[:, k:], cos, sin, None)
            if routes is not None and route is not None:
                routes[f"mtp.{k - 1}"] = route
            outs.append(h)
        return outs

    def mtp_head_input(self, h_k: torch.Tensor, depth: int) -> torch.Tensor:
        """h_k through MTP module `depth`'s own final norm: what the shared output head reads."""
        return self.mtp[depth - 1].shared_head.norm(h_k)

    def mtp_logits(self, h_k: torch.Tensor, depth: int) -> torch.Tensor:
        return self.lm_head(self.mtp_head_input(h_k, depth))

    def mtp_step(
        self,
        depth: int,
        h_prev: torch.Tensor,
        next_ids: torch.Tensor,
        cache,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MTP module `depth` over T new positions of a decode cache (its own, see `KVCache.for_mtp`).

        h_prev [B, T, hidden] is the previous depth's hidden state at each position and next_ids
        [B, T] the token that follows it (t_{i+k} in the training layout); `attention_mask` [B, T]
        marks the real positions. Returns h_depth [B, T, hidden] (logits via `mtp_logits`).
        """
        if not 1 <= depth <= len(self.mtp):
            raise ValueError(f"MTP depth must be in [1, {len(self.mtp)}], got {depth}")
        self._check_input(next_ids, attention_mask)
        mask, cos, sin, _ = self._attention_inputs(next_ids, attention_mask, None, cache)
        h, _ = self.mtp[depth - 1](h_prev, self.model.embed_tokens(next_ids), cos, sin, mask, cache)
        cache.advance(next_ids.shape[1])
        return h

    def _check_input(self, input_ids, attention_mask) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a LongTensor [batch, seq], got {shape}")
        if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if attention_mask is not None and attention_mask.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"attention_mask batch {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        mtp: str = "if_present",
        keep_fp8: bool = False,
    ) -> Transformer:
        """Build the model described by `path/config.json` and load its hub-layout safetensors weights.

        `mtp` chooses the Multi-Token Prediction modules: "if_present" (default) loads those whose
        weights are there and warns about any declared but missing (transformers does not save
        them), "require" fails unless all are there, "skip" builds none. The model is created on
        the meta device and allocated once in `dtype` on `device`; tensors are read one at a time
        from memory-mapped files, so peak memory is about one model plus one tensor. FP8 weights are
        dequantized into `dtype`; with `keep_fp8=True` (an FP8 checkpoint only) they stay e4m3 with
        their scales, dequantized block by block inside each product (`quant/fp8_inference.py`).
        """
        directory = Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"model directory {directory} does not exist")
        config, skipped_layers = checkpoint_config(directory, mtp)
        with torch.device("meta"):
            model = cls(config)
        if keep_fp8:
            keep_fp8_layers(model, directory)
        model.to(dtype=dtype)
        model.to_empty(device=device)
        with torch.no_grad():
            load_state_into(model, directory, skip_layers=skipped_layers)
        model.reset_buffers()
        return model.eval()

    def save_pretrained(self, directory: str | Path, **options) -> Path:
        """Write the hub layout (config, weights, optionally the tokenizer) into `directory`,
        replacing it atomically; `options` as in `seekformer.checkpoint.save_pretrained`."""
        return save_pretrained(self, directory, **options)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype
