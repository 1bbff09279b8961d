"""Block, Multi-Token Prediction layers and the Transformer: one module for every DeepSeek config."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import GQAttention, MLAttention, build_attention_mask
from .layers import MLP, RMSNorm, RotaryEmbedding
from .moe import MoE


class Block(nn.Module):
    """Pre-norm decoder layer: attention then dense MLP or MoE (hub names throughout)."""

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

    def forward(self, h: torch.Tensor, cos, sin, mask, cache=None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


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

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, cos, sin, mask, cache=None) -> torch.Tensor:
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
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, MoE):
                nn.init.normal_(module.gate.weight, 0.0, std)
                nn.init.normal_(module.experts.gate_up_proj, 0.0, std)
                nn.init.normal_(module.experts.down_proj, 0.0, std)
                if module.gate.e_score_correction_bias is not None:
                    module.gate.e_score_correction_bias.zero_()
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after `to_empty` from the meta device)."""
        self.model.rotary.reset_buffers()
        for module in self.modules():
            if isinstance(module, MoE):
                module.tokens_per_expert = torch.zeros_like(module.tokens_per_expert)

    # ------------------------------------------------------------------ forward
    def positions(self, input_ids, attention_mask, past_len: int = 0) -> torch.Tensor:
        B, T = input_ids.shape
        if attention_mask is not None and past_len == 0:
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return torch.arange(past_len, past_len + T, device=input_ids.device).expand(B, T)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, T, hidden] (h_0 of Multi-Token Prediction)."""
        self._check_input(input_ids, attention_mask)
        B, T = input_ids.shape
        past_len = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = self.positions(input_ids, attention_mask, past_len)
        key_padding = attention_mask
        if key_padding is not None and bool(key_padding.all()):
            key_padding = None  # nothing padded: plain causal attention takes the fused kernel
        if cache is not None:
            key_padding = cache.key_padding(attention_mask, T)
        mask = build_attention_mask(key_padding, T, past_len + T, input_ids.device)
        cos, sin = self.model.rotary(position_ids)
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        return self.model.norm(h)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
    ) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache))

    def mtp_hidden_states(
        self, h: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Hidden states of each MTP depth k (training layout, no cache).

        Depth k at position i combines h_{k-1} at i with the embedding of token i+k and predicts
        token i+k+1; it is valid for i < T-k, so the k-th output has T-k positions.
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
            h = layer(h[:, : T - k], emb[:, k:], cos, sin, None)
            outs.append(h)
        return outs

    def mtp_logits(self, h_k: torch.Tensor, depth: int) -> torch.Tensor:
        return self.lm_head(self.mtp[depth - 1].shared_head.norm(h_k))

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

    # ------------------------------------------------------------------ conveniences
    def save_pretrained(self, directory, **kwargs) -> None:
        from ..checkpoint import save_pretrained

        save_pretrained(self, directory, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype
