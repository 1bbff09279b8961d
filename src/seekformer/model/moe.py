"""DeepSeekMoE: a router, fine-grained routed experts and always-on shared experts.

Shapes: N tokens, H hidden size, E routed experts, K experts per token, S = N*K slots (token-expert
pairs), I expert intermediate size.

Router (scores in float32):
- softmax scores, greedy top-k (DeepSeekMoE, V2) or group-limited: group score = max (V2);
- sigmoid scores plus a per-expert bias used for selection only (V3 auxiliary-loss-free balancing),
  group score = sum of the two largest biased scores, gate weights from the unbiased scores.

Experts: the slots are sorted by expert and each expert runs over its contiguous rows (the only
Python loop is over experts, never over tokens). `Experts.compute` is that step alone, rows sorted
by expert plus per-expert counts in, rows out: the seam where expert parallelism exchanges rows
between ranks. The kernels (one grouped GEMM on CUDA, a per-expert loop with a hand-written backward
on CPU) live in `expert_kernels.py`; the plain loop left to autograd here is their reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .expert_kernels import grouped_experts, looped_experts, select_implementation
from .layers import MLP, compute_dtype


@dataclass
class RouterOutput:
    indices: torch.Tensor  # [N, K] selected experts
    weights: torch.Tensor  # [N, K] gate weights (float32), scaling factor applied
    scores: torch.Tensor  # [N, E] unbiased affinities s_{i,t} (float32), for balance losses
    counts: torch.Tensor  # [E] tokens routed to each expert (long)


class Router(nn.Module):
    """x [N, H] -> the K experts of each token, their gate weights and the per-expert counts."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.scoring = config.scoring_func
        self.n_group = config.n_group if config.uses_groups else 1
        self.topk_group = config.topk_group if config.uses_groups else 1
        # V3 (sigmoid) normalises whenever the flag is set, a single expert's gate included (it becomes
        # exactly routed_scaling_factor), as DeepSeek-V3's inference code and transformers do; the V1/V2
        # code (softmax) normalises only when more than one expert is chosen
        self.norm_topk_prob = config.norm_topk_prob and (self.scoring == "sigmoid" or self.top_k > 1)
        self.scaling = config.routed_scaling_factor
        self.init_std = config.initializer_range
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))  # [E, H]
        if config.topk_method == "noaux_tc":
            # kept in float32 whatever the model dtype: updates of 1e-3 must not round away
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, self.init_std)
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.zero_()

    def _apply(self, fn, recurse=True):
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        if bias is not None:
            moved = fn(bias)  # follows the device, but never leaves float32
            self.e_score_correction_bias = bias.to(moved.device) if moved.dtype != torch.float32 else moved
        return self

    def forward(self, x: torch.Tensor) -> RouterOutput:
        with torch.autocast(x.device.type, enabled=False):  # routing stays float32 under bf16 autocast
            logits = F.linear(x.float(), self.weight.float())  # [N, E]
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        return self.route_to(scores, self.select(scores))

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """The K experts [N, K] the router chooses for tokens with affinities `scores` [N, E]."""
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
            if self.e_score_correction_bias is not None:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(-1, self.n_experts)
        return choice.topk(self.top_k, dim=-1, sorted=False).indices

    def route_to(self, scores: torch.Tensor, indices: torch.Tensor) -> RouterOutput:
        """The routing of tokens with affinities `scores` [N, E] to the experts `indices` [N, K]
        (the router's own choice, or one replayed: GRPO's routing replay)."""
        weights = scores.gather(1, indices)  # [N, K]
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.scaling
        # scatter_add rather than bincount, which reads the largest index on the host (a sync on CUDA)
        flat = indices.flatten()
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        return RouterOutput(indices, weights, scores, counts)


class Experts(nn.Module):
    """All routed experts' weights stacked: gate_up_proj [E, 2I, H] and down_proj [E, H, I].

    Checkpoints keep the hub's per-expert keys (`experts.{j}.gate_proj.weight`...); `checkpoint.py`
    converts between the two layouts. `implementation` is "auto" (`select_implementation`), or forces
    "grouped_mm", "loop" or "autograd_loop" (the reference loop, for tests and benchmarks).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, H, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.n_experts, self.intermediate = E, I
        self.init_std = config.initializer_range
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.implementation = "auto"  # "auto" | "grouped_mm" | "loop" | "autograd_loop"
        # memory the "loop" path keeps between steps (weight gradients, the weights in the compute
        # dtype, row buffers), reused once nothing else holds it
        self._grad_storage: dict[str, torch.UntypedStorage] = {}

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_grad_storage"] = {}  # a copy or pickle of the module does not carry gradient memory
        return state

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up_proj, 0.0, self.init_std)
        nn.init.normal_(self.down_proj, 0.0, self.init_std)

    def forward(self, x: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        """x [N, H] -> [N, H]: the sum over each token's K selected experts of weight * expert(x)."""
        order = route.indices.flatten().argsort(stable=True)  # [S] slots sorted by expert
        token_of_slot = order // route.indices.shape[1]  # [S]
        slot_weights = route.weights.flatten().index_select(0, order)  # [S]
        implementation = self.resolve_implementation(x.device, x.dtype)
        if implementation == "loop":  # gathers the rows and sums them into the tokens itself
            return looped_experts(x, slot_weights, token_of_slot, route.counts, self.gate_up_proj, self.down_proj,
                                  compute_dtype(x.device.type, x.dtype), self._grad_storage)
        ys = self.compute(x.index_select(0, token_of_slot), route.counts, implementation)  # [S, H]
        ys = (ys * slot_weights.unsqueeze(-1)).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_slot, ys)

    def compute(self, xs: torch.Tensor, counts: torch.Tensor, implementation: str | None = None) -> torch.Tensor:
        """down(silu(gate) * up) of each expert over its rows: xs [S, H] sorted by expert, counts [E]
        rows per expert (long, on xs's device) -> [S, H], unweighted (in the compute dtype; the CPU
        loop returns xs's dtype)."""
        implementation = implementation or self.resolve_implementation(xs.device, xs.dtype)
        dtype = compute_dtype(xs.device.type, xs.dtype)
        if implementation == "grouped_mm":
            return grouped_experts(xs, counts, self.gate_up_proj, self.down_proj, dtype)
        if implementation == "loop":  # each row its own token, weight 1
            rows = torch.arange(xs.shape[0], device=xs.device)
            ones = torch.ones(xs.shape[0], dtype=torch.float32, device=xs.device)
            return looped_experts(xs, ones, rows, counts, self.gate_up_proj, self.down_proj, dtype,
                                  self._grad_storage)
        return self._autograd_loop(xs, counts)

    def resolve_implementation(self, device: torch.device, dtype: torch.dtype) -> str:
        """The path for inputs of `dtype` on `device`: `implementation` unless "auto", else chosen from
        the device and the dtype the products run in (the autocast dtype under autocast)."""
        if self.implementation == "auto":
            return select_implementation(device, compute_dtype(device.type, dtype))
        return self.implementation

    def _autograd_loop(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The reference: one product pair per expert, left to autograd."""
        # unbind once: indexing the stacked parameter per expert would make backward build one
        # full-size [E, ...] gradient per expert (measured 12x slower in fp32)
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        outs = []
        for expert, chunk in enumerate(xs.split(counts.tolist())):
            if chunk.shape[0]:
                gate, up = F.linear(chunk, gate_up[expert]).chunk(2, dim=-1)
                outs.append(F.linear(F.silu(gate) * up, down[expert]))
        return torch.cat(outs) if outs else xs.new_zeros(xs.shape)


class MoE(nn.Module):
    """Shared experts (one MLP of n_shared * moe_intermediate_size) plus routed experts.

    The forward returns the routing it used beside the output: its `counts` are the layer's expert
    loads, which the trainer sums over a step for the auxiliary-loss-free bias update, and its scores
    feed the balance losses. Returned rather than kept in the module, so that a forward run twice
    (activation checkpointing recomputes it in the backward) is counted once.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        n_shared = config.n_shared_experts or 0
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * n_shared) if n_shared else None
        )
        self.replay_indices: torch.Tensor | None = None  # [N, K] experts to use instead of the router's choice

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        """x [..., H] -> (output [..., H], the routing of its N tokens)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        route = self.gate(flat)
        if self.replay_indices is not None:  # routing replay: the experts chosen in an earlier pass
            route = self.gate.route_to(route.scores, self.replay_indices)
        out = self.experts(flat, route)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape), route
