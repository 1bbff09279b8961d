"""A paged latent cache: fixed-size blocks of token slots shared by every sequence of the engine.

The pool holds, per attention layer, one tensor of `num_blocks * block_size` slots: for MLA the
normalised latent and the roped key side by side ([slots, kv_lora_rank + qk_rope_head_dim], as
`KVCache`), for MHA/GQA keys and values ([slots, kv_heads, head_dim] each). A sequence owns a list
of blocks (its block table); blocks are taken from the free list as it grows and returned when it
ends. Nothing is ever copied to grow or to drop a sequence.

A forward pass sees the pool through a `PagedStep`, which honours the interface the model calls on a
cache (`length`, `positions`, `key_padding`, `update_latent` / `update_kv`, `use_absorbed`,
`advance`): each row's new tokens are written into its own slots, and the layer gets back a dense
[B, past + T, ...] view gathered through the block tables: the row's cached tokens left-aligned,
masked padding up to the longest row, then the new tokens (so the model's causal mask over "the
last T of S keys" holds for every row). The gather index is computed once per step and shared by
all layers; reading the cache through it costs one extra copy of the rows' latents per layer,
which is what a paged attention kernel avoids on a GPU. The model itself needs no change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import ModelConfig
from ..inference.cache import KVCache


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for (the scheduler preempts before this happens)."""


class BlockPool:
    """The cache storage of every attention layer and its free list of blocks."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 extra_layers: Sequence[int] = ()) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        if config.engram_layer_ids:
            raise ValueError("the serving engine does not support Engram layers yet (their decode state is "
                             "not paged); use seekformer.inference.generate for Engram models")
        self.config, self.num_blocks, self.block_size = config, num_blocks, block_size
        self.dtype, self.device = dtype, torch.device(device)
        slots = (num_blocks + 1) * block_size  # the last block is scratch: padding tokens write there
        self.scratch_slot = num_blocks * block_size
        if config.is_mla:
            shapes: list[tuple[int, ...]] = [(config.kv_lora_rank + config.qk_rope_head_dim,)]
        else:
            shapes = [(config.num_key_value_heads, config.attn_head_dim)] * 2
        # zeros, not empty: masked slots still enter the attention products (0 x NaN would be NaN)
        # per attention layer (the decoder's, then `extra_layers`: MTP modules on the same slot grid)
        self.layers = {layer: [torch.zeros(slots, *shape, dtype=dtype, device=self.device) for shape in shapes]
                       for layer in (*range(config.num_hidden_layers), *extra_layers)}
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: recently freed blocks are reused first

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(f"asked for {count} cache blocks, {len(self._free)} free")
        taken = self._free[len(self._free) - count:]
        del self._free[len(self._free) - count:]
        return taken[::-1]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def bytes_per_token(self) -> int:
        return sum(t[0].numel() * t.element_size() for layer in self.layers.values() for t in layer)  # one slot

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers.values() for t in layer)


class PagedStep:
    """The cache of one forward pass over B rows: row b adds new[b] tokens after its own past[b].

    Rows with fewer new tokens than the longest are right-padded: their padding writes to the pool's
    scratch block, is masked out as keys and repeats the row's last position. block_tables
    [B, max_blocks] (long; entries past a row's blocks are ignored) and `past`, `new` (python ints)
    describe the rows; every row's blocks must already cover past + new tokens.
    """

    def __init__(self, pool: BlockPool, block_tables: torch.Tensor, past: list[int], new: list[int],
                 attention_path: str = "auto") -> None:
        self.pool, self.config = pool, pool.config
        self.attention_path = attention_path
        device, bs = pool.device, pool.block_size
        B, T = len(past), max(new)
        self.length = max(past)  # slots before the new tokens in the dense view
        self.batch_size = B
        past_t = torch.tensor(past, dtype=torch.long, device=device).unsqueeze(1)
        new_t = torch.tensor(new, dtype=torch.long, device=device).unsqueeze(1)
        span = torch.arange(T, device=device)
        real = span < new_t  # [B, T] which new slots hold a token
        self._positions = past_t + torch.minimum(span, new_t - 1)  # [B, T]; padding repeats the last

        def slot_of(pos: torch.Tensor) -> torch.Tensor:
            return block_tables.gather(1, torch.div(pos, bs, rounding_mode="floor")) * bs + pos % bs

        write = torch.where(real, slot_of(self._positions), pool.scratch_slot)  # [B, T]
        self._write = write.flatten()
        old = torch.arange(self.length, device=device).expand(B, self.length)
        old_valid = old < past_t
        old_slots = torch.where(old_valid, slot_of(torch.where(old_valid, old, 0)), pool.scratch_slot)
        self._read = torch.cat((old_slots, write), dim=1).flatten()  # [B*(S+T)]
        self._padding = None
        if min(past) != self.length or min(new) != T:
            self._padding = torch.cat((old_valid, real), dim=1)
        self.new_valid = None if min(new) == T else real  # [B, T] which new positions are real tokens
        self.extras: dict = {}

    # ------------------------------------------------------------------ what the model calls
    def positions(self, attention_mask: torch.Tensor | None, num_new: int) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("a paged step takes its padding from `new`, not from an attention mask")
        return self._positions

    def key_padding(self, attention_mask: torch.Tensor | None, num_new: int) -> torch.Tensor | None:
        return self._padding

    def advance(self, num_new: int) -> None:
        """Nothing to do: the scheduler owns the sequence lengths."""

    def use_absorbed(self, num_new: int, nope_dim: int, v_dim: int) -> bool:
        return KVCache.use_absorbed(self, num_new, nope_dim, v_dim)  # same cost model, same attributes

    def update_latent(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        (store,) = self.pool.layers[layer_idx]
        B, T, _ = c_kv.shape
        store.index_copy_(0, self._write, torch.cat((c_kv, k_pe), dim=-1).reshape(B * T, -1).to(store.dtype))
        return store.index_select(0, self._read).view(B, self.length + T, -1)

    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_store, v_store = self.pool.layers[layer_idx]
        B, T = k.shape[:2]
        k_store.index_copy_(0, self._write, k.reshape(B * T, *k.shape[2:]).to(k_store.dtype))
        v_store.index_copy_(0, self._write, v.reshape(B * T, *v.shape[2:]).to(v_store.dtype))
        shape = (B, self.length + T, *k.shape[2:])
        return k_store.index_select(0, self._read).view(shape), v_store.index_select(0, self._read).view(shape)

    def extra(self, layer_idx: int, factory):
        raise NotImplementedError("paged steps hold no extra (Engram) state")
