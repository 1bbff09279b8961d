"""DeepSeekMoE: a router, fine-grained routed experts and always-on shared experts.

Routing (scores in float32):
- softmax scores, greedy top-k (DeepSeekMoE, V2) or group-limited: group score = max (V2);
- sigmoid scores plus a per-expert bias used for selection only (V3 auxiliary-loss-free balancing),
  group score = sum of the two largest biased scores, gate weights from the unbiased scores.

Routed experts run as one matrix product per expert over the tokens sorted by expert: the only
Python loop is over experts, never over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP


@dataclass
class RouterOutput:
    indices: torch.Tensor  # [N, K] selected experts
    weights: torch.Tensor  # [N, K] gate weights (float32), scaling factor applied
    scores: torch.Tensor  # [N, E] unbiased affinities s_{i,t} (float32), for balance losses
    counts: torch.Tensor  # [E] tokens routed to each expert (long)


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.scoring = config.scoring_func
        self.n_group = config.n_group if config.uses_groups else 1
        self.topk_group = config.topk_group if config.uses_groups else 1
        self.norm_topk_prob = config.norm_topk_prob and self.top_k > 1
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        if config.topk_method == "noaux_tc":
            # kept in float32 whatever the model dtype: updates of 1e-3 must not round away
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

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
        indices = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.scaling
        counts = torch.bincount(indices.flatten(), minlength=self.n_experts)
        return RouterOutput(indices, weights, scores, counts)


class Experts(nn.Module):
    """All routed experts' weights stacked: gate_up_proj [E, 2I, H] and down_proj [E, H, I].

    Checkpoints keep the hub's per-expert keys (`experts.{j}.gate_proj.weight`...); `checkpoint.py`
    converts between the two layouts.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, H, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.n_experts, self.intermediate = E, I
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.implementation = "auto"  # "auto" | "grouped_mm" | "loop"

    def forward(self, x: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        """x [N, H] -> sum over each token's selected experts of weight * expert(x)."""
        top_k = route.indices.shape[1]
        order = route.indices.flatten().argsort(stable=True)  # slots sorted by expert
        token_of_slot = order // top_k
        xs = x.index_select(0, token_of_slot)  # [N*K, H]
        if self.use_grouped_mm(xs):
            ys = self._grouped(xs, route.counts)
        else:
            ys = self._looped(xs, route.counts)
        slot_weights = route.weights.flatten().index_select(0, order).unsqueeze(-1)
        ys = (ys * slot_weights).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_slot, ys)

    def use_grouped_mm(self, xs: torch.Tensor) -> bool:
        """`implementation` "auto" picks one grouped GEMM on CUDA in bf16 (no host sync) and the
        per-expert loop elsewhere: on CPU the loop measured as fast in bf16 and 1.5x faster in fp32
        (benchmarks/experts.py)."""
        if self.implementation == "auto":
            return xs.is_cuda and xs.dtype == torch.bfloat16 and hasattr(F, "grouped_mm")
        return self.implementation == "grouped_mm"

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = counts.cumsum(0).to(torch.int32)
        gate_up = F.grouped_mm(xs, self.gate_up_proj.to(xs.dtype).transpose(1, 2), offs=offsets)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.grouped_mm(F.silu(gate) * up, self.down_proj.to(xs.dtype).transpose(1, 2), offs=offsets)

    def _looped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
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

    In training mode `tokens_per_expert` accumulates the routed token counts until the trainer reads
    and resets it (auxiliary-loss-free bias update after each optimizer step).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        n_shared = config.n_shared_experts or 0
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * n_shared) if n_shared else None
        )
        self.register_buffer("tokens_per_expert", torch.zeros(config.n_routed_experts, dtype=torch.long),
                             persistent=False)
        self.last_route: RouterOutput | None = None
        self.keep_route = False  # set by the trainer when it needs scores for balance losses

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        route = self.gate(flat)
        if self.training:
            self.tokens_per_expert += route.counts
        self.last_route = route if self.keep_route else None
        out = self.experts(flat, route)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)
