"""Expert load balancing of DeepSeek-V3 (formulas: shared/reference/formulas.md, Balancing).

- auxiliary-loss-free balancing: after each optimizer step, every MoE layer's selection bias moves
  by gamma * sign(mean load - load_i), loads counted over all micro-batches of the step;
- the sequence-wise balance loss alpha * sum_i f_i P_i per sequence (V3 eqs. 17-20);
- the V2 expert-level auxiliary loss (the same form over the whole batch), for comparisons;
- MaxVio = max_i load_i / mean load - 1.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.moe import MoE, RouterOutput


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """Every MoE module of a Transformer by a short name: `layers.3` (decoder) or `mtp.0`."""
    out: dict[str, MoE] = {}
    for i, layer in enumerate(model.model.layers):
        if isinstance(layer.mlp, MoE):
            out[f"layers.{i}"] = layer.mlp
    for k, layer in enumerate(model.mtp):
        if isinstance(layer.mlp, MoE):
            out[f"mtp.{k}"] = layer.mlp
    return out


def _normalised_scores(scores: torch.Tensor) -> torch.Tensor:
    """s'_{i,t} = s_{i,t} / sum_j s_{j,t} (sigmoid affinities; softmax scores are unchanged)."""
    return scores / scores.sum(dim=-1, keepdim=True)


def sequence_balance_loss(route: RouterOutput, batch_size: int, alpha: float) -> torch.Tensor:
    """V3 eqs. 17-20: alpha * sum_i f_i P_i per sequence, averaged over the batch's sequences.

    f_i = N_r / (K_r T) * (tokens of the sequence that selected expert i) carries no gradient;
    P_i = mean over the sequence's tokens of the normalised affinity s'_{i,t}. Tokens are the rows
    of `route` in batch-major order, T = rows / batch_size.
    """
    n, n_experts = route.scores.shape
    if n % batch_size:
        raise ValueError(f"router saw {n} tokens, not a multiple of the batch size {batch_size}")
    seq_len, top_k = n // batch_size, route.indices.shape[1]
    indices = route.indices.reshape(batch_size, seq_len * top_k)
    counts = torch.zeros(batch_size, n_experts, dtype=torch.float32, device=indices.device)
    counts.scatter_add_(1, indices, torch.ones(indices.shape, dtype=torch.float32, device=indices.device))
    f = counts * (n_experts / (top_k * seq_len))  # [B, E]
    p = _normalised_scores(route.scores).view(batch_size, seq_len, n_experts).mean(dim=1)  # [B, E]
    return alpha * (f * p).sum(dim=-1).mean()


def expert_balance_loss(route: RouterOutput, alpha: float) -> torch.Tensor:
    """V2 expert-level auxiliary loss over all tokens of the batch: alpha * sum_i f_i P_i,
    f_i = N_r / (K_r N) * count_i, P_i = mean over tokens of the (normalised) affinity."""
    n, n_experts = route.scores.shape
    top_k = route.indices.shape[1]
    counts = torch.bincount(route.indices.flatten(), minlength=n_experts).float()
    f = counts * (n_experts / (top_k * n))
    p = _normalised_scores(route.scores).mean(dim=0)
    return alpha * (f * p).sum()


def load_violation(counts: torch.Tensor) -> torch.Tensor:
    """MaxVio = max_i c_i / mean(c) - 1 (0 = perfectly balanced; 0 when nothing was routed), as a
    tensor on the counts' device (no host sync)."""
    counts = counts.float()
    mean = counts.mean()
    return torch.where(mean > 0, counts.max() / mean.clamp(min=1e-12) - 1, torch.zeros_like(mean))


def max_violation(counts: torch.Tensor) -> float:
    """`load_violation` as a Python float."""
    return float(load_violation(counts))


@torch.no_grad()
def update_bias(moe: MoE, counts: torch.Tensor, gamma: float) -> None:
    """b_i += gamma * sign(mean load - load_i): overloaded experts become less likely to be chosen.

    `counts` are the tokens routed to each expert during the whole optimizer step (summed over
    micro-batches; with data parallelism they must be summed over ranks first).
    """
    bias = moe.gate.e_score_correction_bias
    if bias is None:
        raise ValueError("auxiliary-loss-free balancing needs topk_method 'noaux_tc' (a router with a bias)")
    counts = counts.to(bias.device, torch.float32)
    bias += gamma * torch.sign(counts.mean() - counts)


def add_loads(loads: dict[str, torch.Tensor], more: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-layer expert loads summed: a step's loads are the sum of the counts its forwards returned."""
    out = dict(loads)
    for name, counts in more.items():
        out[name] = out[name] + counts if name in out else counts
    return out
