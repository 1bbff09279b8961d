"""Per-GPU memory and per-step communication of a dp x ep layout (`seekformer info --parallel`).

Memory counts what this package's sharding puts on each rank; activations are not counted (they
depend on sequence length, micro-batch and activation checkpointing):
- weights (fp32 master copy), gradients (fp32) and AdamW's two moments (fp32): dense weights sharded
  over all `dp * ep` ranks; routed experts split over `ep`, each split sharded over `dp`, so every
  parameter has 1 / world of its bytes on each rank;
- the gathered working set: FSDP gathers one block at a time (and prefetches the next), the block's
  dense weights in full and its experts' E / ep share;
- Engram tables are replicated (`replicated.py`): whole on every rank with their SparseAdam moments;
  their gradient holds the rows the global batch looked up (at most one per token, order and head).

Communication per optimizer step and rank (bytes received; ring collectives move (n-1)/n of the
gathered size): parameter all-gathers in the forward and again in the backward, one gradient
reduce-scatter, and the MoE all-to-alls (dispatch and combine, forward and backward) of the tokens
this rank routes; with Engram, the looked-up rows (and their indices) every other rank sends in
place of a table reduction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..model.engram import Engram
from ..model.moe import Experts
from ..model.transformer import Transformer

FP32 = 4


@dataclass
class ParallelFootprint:
    dp: int
    ep: int
    params: int  # all parameters (MTP included)
    expert_params: int  # routed experts (MTP's included)
    weights_bytes: float  # per rank
    grads_bytes: float
    optimizer_bytes: float
    gathered_bytes: float  # two blocks gathered at once (the one running and the prefetched one)
    allgather_bytes: float  # per step, forward + backward
    reduce_scatter_bytes: float
    all_to_all_bytes: float  # this implementation: one row per (token, remote expert)
    all_to_all_node_limited_bytes: float  # one row per (token, remote group) when n_group == ep
    replicated_params: int = 0  # Engram tables, whole on every rank
    sparse_gather_bytes: float = 0.0  # per step: the Engram gradient rows of the other ranks

    @property
    def world(self) -> int:
        return self.dp * self.ep

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.gathered_bytes


def parallel_footprint(config: ModelConfig, dp: int, ep: int, tokens_per_rank: int = 4096,
                       activation_bytes: int = 2) -> ParallelFootprint:
    """Memory per rank and communication per step of `config` on dp x ep ranks, `tokens_per_rank`
    tokens per rank and step, activations exchanged in `activation_bytes` per value (bf16)."""
    with torch.device("meta"):
        model = Transformer(config)
    world = dp * ep
    experts = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    engrams = [m for m in model.modules() if isinstance(m, Engram)]
    tables = {id(m.table.weight) for m in engrams}
    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for p in model.parameters() if id(p) in experts)
    table_params = sum(m.table.weight.numel() for m in engrams)
    dense = params - expert_params - table_params
    sharded = params - table_params

    def gathered(block) -> int:  # a block's dense weights in full, its experts' E / ep share
        return sum(p.numel() if id(p) not in experts else p.numel() // ep for p in block.parameters()
                   if id(p) not in tables)

    blocks = sorted((gathered(b) for b in [*model.model.layers, *model.mtp]), reverse=True)
    working = sum(blocks[:2]) * FP32
    ring = (world - 1) / world
    ring_dp = (dp - 1) / dp
    allgather = 2 * (dense * ring + expert_params / ep * ring_dp) * FP32
    reduce_scatter = (dense * ring + expert_params / ep * ring_dp) * FP32
    moe_layers = sum(1 for i in range(config.num_hidden_layers) if config.is_moe_layer(i))
    moe_layers += config.num_nextn_predict_layers if config.is_moe else 0
    row = config.hidden_size * activation_bytes * 4  # dispatch + combine, forward + backward
    remote = config.num_experts_per_tok * (ep - 1) / ep if config.is_moe else 0.0
    node_limited = remote
    if config.is_moe and config.uses_groups and config.n_group == ep:
        node_limited = config.topk_group * (ep - 1) / ep
    per_layer = tokens_per_rank * row * moe_layers
    # Engram: one looked-up row per token, order and head; the averaged gradient holds the global
    # batch's distinct rows, and each rank receives every other rank's rows (fp32) and indices (int64)
    table_grads = sum(min(m.table.num_embeddings, world * tokens_per_rank * len(m._primes)) * m.head_dim
                      for m in engrams)
    gather = sum((world - 1) * tokens_per_rank * len(m._primes) * (m.head_dim * FP32 + 8) for m in engrams)
    return ParallelFootprint(dp, ep, params, expert_params, (sharded / world + table_params) * FP32,
                             (sharded / world + table_grads) * FP32, 2 * (sharded / world + table_params) * FP32,
                             working, allgather, reduce_scatter, per_layer * remote, per_layer * node_limited,
                             table_params, gather)


def format_footprint(f: ParallelFootprint, tokens_per_rank: int) -> str:
    gib = 2 ** 30

    def g(n: float) -> str:
        return f"{n / gib:,.1f} GiB"

    engram = [f"    Engram rows    {g(f.sparse_gather_bytes)}  (the looked-up rows of the other ranks' "
              "table gradients)"] if f.replicated_params else []
    return "\n".join([
        f"parallel layout dp={f.dp} x ep={f.ep} = {f.world} ranks ({f.params / 1e9:.1f}B parameters, "
        f"{f.expert_params / 1e9:.1f}B in routed experts"
        + (f", {f.replicated_params / 1e9:.2f}B in Engram tables replicated on every rank)" if f.replicated_params
           else ")"),
        "  memory per rank (fp32 weights, gradients and AdamW moments; activations not counted)",
        f"    weights        {g(f.weights_bytes)}  (dense over all ranks; experts 1/ep each, sharded over dp"
        + ("; Engram tables whole)" if f.replicated_params else ")"),
        f"    gradients      {g(f.grads_bytes)}",
        f"    optimizer      {g(f.optimizer_bytes)}  (AdamW exp_avg, exp_avg_sq"
        + ("; the tables' SparseAdam ones)" if f.replicated_params else ")"),
        f"    gathered       {g(f.gathered_bytes)}  (two blocks unsharded at a time)",
        f"    total          {g(f.total_bytes)}",
        f"  communication per step and rank ({tokens_per_rank:,} tokens per rank)",
        f"    all-gather     {g(f.allgather_bytes)}  (weights, forward and backward)",
        f"    reduce-scatter {g(f.reduce_scatter_bytes)}  (gradients)",
        f"    all-to-all     {g(f.all_to_all_bytes)}  (one row per token and remote expert, bf16)",
        f"                   {g(f.all_to_all_node_limited_bytes)}  (one row per token and remote group: "
        "node-limited dispatch)",
        *engram,
    ])


def parse_layout(text: str) -> tuple[int, int]:
    """`dp=8,ep=4` -> (8, 4); either may be left out (1)."""
    sizes = {"dp": 1, "ep": 1}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--parallel {text!r}: expected dp=N,ep=M with positive integers")
        sizes[key.strip()] = int(value)
    return sizes["dp"], sizes["ep"]
