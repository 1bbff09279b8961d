"""Decode cache: the MLA latent (or MHA/GQA keys and values) of every token seen, per layer.

One `KVCache` serves one batch of sequences and one stack of layers (the main model's, or one
Multi-Token Prediction module's). It stores per layer and token:

- MLA: the normalised latent `c_kv` and the roped key `k_pe`, side by side in one buffer
  [B, capacity, kv_lora_rank + qk_rope_head_dim], so the absorbed decode path can attend over it
  without copying (the latent doubles as the value);
- MHA/GQA: keys and values [B, capacity, kv_heads, head_dim].

Buffers grow in chunks of `chunk` slots as tokens arrive; nothing is sized by the model's context.
Their dtype is the model's.

Every row shares the same slot grid. A slot may be invalid for a row (left padding of a shorter
prompt, or a drafted token the row rejected during speculative decoding): invalid slots are masked
out as keys and do not count towards positions, so a row's RoPE positions are the number of valid
slots before it. Per-layer extra decode state (Engram) lives in `extras`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

from ..config import ModelConfig
from ..model.layers import rope_positions

DEFAULT_CHUNK = 256
ATTENTION_PATHS = ("auto", "naive", "absorbed")


class ExtraState(Protocol):
    """Per-layer state that must follow the cache's rollbacks and row selections (e.g. `EngramState`).

    It sees each row's real tokens only; `rollback(n)` forgets the last n[b] real tokens of row b.
    """

    def rollback(self, num_tokens: torch.Tensor) -> None: ...

    def reorder(self, index: torch.Tensor) -> None: ...


class KVCache:
    """Latent / KV cache of a batch of `batch_size` sequences over the given attention layers.

    Attention modules call `update_latent` (MLA) or `update_kv` (MHA/GQA) once per forward;
    `Transformer.hidden_states` calls `positions` and `key_padding` before the layers and `advance`
    after them. `attention_path` picks the MLA computation: "naive" (expand the latent to per-head
    keys/values), "absorbed" (attend over the latent) or "auto" (the cheaper one for the step).
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        layers: Iterable[int] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        chunk: int = DEFAULT_CHUNK,
        attention_path: str = "auto",
    ) -> None:
        if attention_path not in ATTENTION_PATHS:
            raise ValueError(f"attention_path must be one of {ATTENTION_PATHS}, got {attention_path!r}")
        if batch_size < 1 or chunk < 1:
            raise ValueError(f"batch_size and chunk must be >= 1, got {batch_size} and {chunk}")
        self.config = config
        self.batch_size = batch_size
        self.dtype, self.device = dtype, torch.device(device)
        self.chunk = chunk
        self.attention_path = attention_path
        layer_ids = list(range(config.num_hidden_layers) if layers is None else layers)
        self._slot = {layer: i for i, layer in enumerate(layer_ids)}
        self._buffers: list[list[torch.Tensor]] = [[] for _ in layer_ids]
        self.length = 0  # slots written (shared by all rows)
        self._capacity = 0
        self._valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)
        self._count = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # valid slots per row
        self._has_holes = False
        self._pending: torch.Tensor | None = None  # validity of the slots being written, [B, T]
        self.extras: dict[int, ExtraState] = {}
        self.max_rollback = 0  # most slots a speculative step may roll back (extra state must keep them)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, **kwargs: Any) -> KVCache:
        """A cache for the main decoder layers of `model` (dtype and device follow the model)."""
        kwargs.setdefault("dtype", model.dtype)
        kwargs.setdefault("device", model.device)
        return cls(model.config, batch_size, **kwargs)

    @classmethod
    def for_mtp(cls, model: torch.nn.Module, depth: int, batch_size: int, **kwargs: Any) -> KVCache:
        """A cache for the attention of Multi-Token Prediction module `depth` (1-based)."""
        kwargs.setdefault("dtype", model.dtype)
        kwargs.setdefault("device", model.device)
        return cls(model.config, batch_size, layers=[model.config.num_hidden_layers + depth - 1], **kwargs)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def valid(self) -> torch.Tensor:
        """[B, length] bool: which slots hold a real token of each row."""
        return self._valid[:, : self.length]

    @property
    def num_tokens(self) -> torch.Tensor:
        """[B] number of valid tokens per row (the next token's RoPE position)."""
        return self._count

    def positions(self, attention_mask: torch.Tensor | None, num_new: int) -> torch.Tensor:
        """RoPE positions [B, T] of `num_new` slots about to be written; `attention_mask` [B, T] marks
        which of them are real (None: all)."""
        return rope_positions(attention_mask, self._count.unsqueeze(1), num_new)

    def key_padding(self, attention_mask: torch.Tensor | None, num_new: int) -> torch.Tensor | None:
        """Key validity [B, length + T] for a step writing `num_new` slots, or None when no slot of any
        row is invalid. Remembers the new slots' validity for `advance`."""
        if attention_mask is not None and attention_mask.shape[1] != num_new:
            attention_mask = attention_mask[:, -num_new:]  # a mask over past + new: take the new part
        new = None if attention_mask is None else attention_mask.to(device=self.device, dtype=torch.bool)
        if new is not None and bool(new.all()):
            new = None
        self._pending = new
        if not self._has_holes and new is None:
            return None
        new = torch.ones(self.batch_size, num_new, dtype=torch.bool, device=self.device) if new is None else new
        return torch.cat((self.valid, new), dim=1)

    @property
    def new_valid(self) -> torch.Tensor | None:
        """[B, T] validity of the slots being written (set by `key_padding`), None when all are real."""
        return self._pending

    def advance(self, num_new: int) -> None:
        """Commit the `num_new` slots the layers just wrote."""
        self._ensure_capacity(self.length + num_new)
        new = self._pending
        self._pending = None
        end = self.length + num_new
        if new is None:
            self._valid[:, self.length:end] = True
            self._count += num_new
        else:
            self._valid[:, self.length:end] = new
            self._count += new.sum(dim=1)
            self._has_holes = True
        self.length = end

    # ------------------------------------------------------------------ layer storage
    def reserve(self, slots: int) -> None:
        """Make room for `slots` slots in all (by then: in every layer's first) buffers, so that a
        generation whose length is known never regrows them: each growth copies the whole cache
        (at 4,096 tokens of the V3-shaped benchmark model, 19 MB)."""
        self._ensure_capacity(slots)

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self._capacity:
            return
        capacity = -(-needed // self.chunk) * self.chunk
        valid = torch.zeros(self.batch_size, capacity, dtype=torch.bool, device=self.device)
        valid[:, : self.length] = self._valid[:, : self.length]
        self._valid = valid
        for buffers in self._buffers:
            for i, old in enumerate(buffers):
                grown = old.new_empty(old.shape[0], capacity, *old.shape[2:])
                grown[:, : self.length] = old[:, : self.length]
                buffers[i] = grown
        self._capacity = capacity

    def _buffers_of(self, layer_idx: int, batch: int, new: int, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
        """The buffers of one layer (allocated on first use, one per trailing `shape`), with room for
        `new` more slots."""
        if layer_idx not in self._slot:
            raise KeyError(f"this cache holds layers {sorted(self._slot)}, not layer {layer_idx}")
        if batch != self.batch_size:
            raise ValueError(f"cache was made for batch {self.batch_size}, got a batch of {batch}")
        self._ensure_capacity(self.length + new)
        buffers = self._buffers[self._slot[layer_idx]]
        if not buffers:
            for shape in shapes:
                buffers.append(torch.empty(self.batch_size, self._capacity, *shape, dtype=self.dtype,
                                           device=self.device))
        return buffers

    def update_latent(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """MLA: store c_kv [B, T, r] and k_pe [B, T, d_r]; return every slot's [c_kv ; k_pe] [B, S, r + d_r]."""
        B, T, r = c_kv.shape
        (buffer,) = self._buffers_of(layer_idx, B, T, (r + k_pe.shape[-1],))
        end = self.length + T
        buffer[:, self.length:end, :r] = c_kv
        buffer[:, self.length:end, r:] = k_pe
        return buffer[:, :end]

    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MHA/GQA: store k, v [B, T, kv_heads, D]; return every slot's keys and values [B, S, kv_heads, D]."""
        k_buf, v_buf = self._buffers_of(layer_idx, k.shape[0], k.shape[1], k.shape[2:], v.shape[2:])
        end = self.length + k.shape[1]
        k_buf[:, self.length:end] = k
        v_buf[:, self.length:end] = v
        return k_buf[:, :end], v_buf[:, :end]

    def use_absorbed(self, num_new: int, nope_dim: int, v_dim: int) -> bool:
        """Whether an MLA step of `num_new` queries should attend over the latent (see attention.py)."""
        if self.attention_path != "auto":
            return self.attention_path == "absorbed"
        if self.length == 0:
            return False  # a first prefill: the fused causal kernel over expanded keys wins
        c = self.config
        S = self.length + num_new
        r, rope = c.kv_lora_rank, c.qk_rope_head_dim
        # multiply-adds per head: expanding every cached latent + attention, vs attention over the latent
        naive = S * r * (nope_dim + v_dim) + num_new * S * 2 * (nope_dim + rope)
        absorbed = num_new * (S * (2 * r + rope) + r * (nope_dim + v_dim))
        return absorbed < naive

    # ------------------------------------------------------------------ rollback and row selection
    def truncate(self, num_slots: int) -> None:
        """Drop the last `num_slots` slots (rejected speculative tokens)."""
        if not 0 <= num_slots <= self.length:
            raise ValueError(f"cannot drop {num_slots} slots from a cache of {self.length}")
        if num_slots == 0:
            return
        start = self.length - num_slots
        dropped = self._valid[:, start:self.length].sum(dim=1)  # real tokens each row loses
        self._count -= dropped
        self._valid[:, start:self.length] = False
        self.length = start
        for extra in self.extras.values():
            extra.rollback(dropped)

    def invalidate_tail(self, keep: torch.Tensor) -> None:
        """Roll back per row: of the last `keep.shape[1]` slots, row b keeps those where `keep[b]` is
        True (a prefix). Slots no row keeps are dropped; the others become holes in the rows that
        reject them."""
        n = keep.shape[1]
        start = self.length - n
        kept = self._valid[:, start:self.length] & keep.to(self.device)
        used = kept.any(dim=0).nonzero()
        region = int(used.max().item()) + 1 if used.numel() else 0  # slots some row still uses
        tail = self._valid[:, start:start + region]
        if region and not bool((kept[:, :region] == tail).all()):
            dropped = (tail & ~kept[:, :region]).sum(dim=1)  # real tokens each row loses in the region
            self._count -= dropped
            tail.copy_(kept[:, :region])
            self._has_holes = True
            for extra in self.extras.values():  # a suffix of each row's tokens, like the truncation below
                extra.rollback(dropped)
        self.truncate(n - region)

    def select(self, index: torch.Tensor) -> None:
        """Keep (and reorder) batch rows: `index` [B'] (e.g. drop finished sequences)."""
        index = index.to(self.device)
        self.batch_size = int(index.shape[0])
        self._valid = self._valid.index_select(0, index)
        self._count = self._count.index_select(0, index)
        self._has_holes = self._has_holes and not bool(self.valid.all())
        for buffers in self._buffers:
            for i, buffer in enumerate(buffers):
                buffers[i] = buffer.index_select(0, index)
        for extra in self.extras.values():
            extra.reorder(index)

    def extra(self, layer_idx: int, factory: Callable[[], ExtraState]) -> ExtraState:
        """The extra decode state of `layer_idx`, created by `factory` on first use."""
        if layer_idx not in self.extras:
            self.extras[layer_idx] = factory()
        return self.extras[layer_idx]

    # ------------------------------------------------------------------ sizes
    def bytes_per_token(self) -> int:
        """Bytes stored per token and row over all layers (excluding extras)."""
        c = self.config
        per_layer = (c.kv_lora_rank + c.qk_rope_head_dim if c.is_mla
                     else 2 * c.num_key_value_heads * c.attn_head_dim)
        return len(self._slot) * per_layer * torch.empty((), dtype=self.dtype).element_size()

    def nbytes(self) -> int:
        """Bytes allocated by the layer buffers."""
        return sum(b.numel() * b.element_size() for buffers in self._buffers for b in buffers)

    def __repr__(self) -> str:
        return (f"KVCache(layers={sorted(self._slot)}, batch={self.batch_size}, length={self.length}, "
                f"capacity={self._capacity}, dtype={self.dtype})")
