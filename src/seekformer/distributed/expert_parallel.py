"""Expert parallelism: each of the `ep` ranks of a group holds `E / ep` consecutive routed experts.

Applied to a built model (`apply_expert_parallel`): every `moe.Experts` is replaced by an
`ExpertParallel` holding its slice of the stacked weights. Its forward, for the N tokens of this rank:
1. the S = N*K slots sorted by expert (as the single-process path), counts [E] per expert;
2. the counts exchanged first (`all_to_all_single`), so each rank knows how many rows it receives
   from each source for each of its experts;
3. the rows sent to the ranks of their experts with a differentiable all-to-all
   (`all_to_all_single_autograd`: its backward is the reverse exchange), regrouped by local expert,
   run through `Experts.compute` (the same kernels), ungrouped and sent back;
4. weighted by the gate and summed into their tokens, as `Experts.forward` does.
Router, shared experts, attention and dense layers are untouched (data-parallel).

`all_to_all_bytes` is what step 3 moves; `expected_remote_copies` what node-limited routing predicts for it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from ..model.moe import Experts, MoE, RouterOutput


class ExpertParallel(Experts):
    """The experts [first, first + n_local) of an `Experts` module, exchanging rows within `group`."""

    def __init__(self, experts: Experts, group: dist.ProcessGroup):
        nn.Module.__init__(self)
        ep, ep_rank = dist.get_world_size(group), dist.get_rank(group)
        self.n_total = experts.n_experts
        self.n_experts, self.intermediate = self.n_total // ep, experts.intermediate
        self.first = ep_rank * self.n_experts
        self.init_std, self.implementation = experts.init_std, experts.implementation
        mine = slice(self.first, self.first + self.n_experts)
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[mine].clone())
        self.down_proj = nn.Parameter(experts.down_proj.detach()[mine].clone())
        self._grad_storage = {}
        self.group, self.ep = group, ep

    def forward(self, x: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        order = route.indices.flatten().argsort(stable=True)  # [S] slots sorted by (global) expert
        token_of_slot = order // route.indices.shape[1]
        slot_weights = route.weights.flatten().index_select(0, order)
        send_counts = route.counts.view(self.ep, self.n_experts)  # [dest rank, local expert]
        recv_counts = torch.empty_like(send_counts)  # [source rank, local expert]
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits = send_counts.sum(dim=1).tolist()
        recv_splits = recv_counts.sum(dim=1).tolist()
        rows = all_to_all_single_autograd(x.index_select(0, token_of_slot), recv_splits, send_splits, self.group)
        # received rows are grouped by source rank, then by expert: regroup by expert
        expert_of_row = torch.arange(self.n_experts, device=x.device).repeat(self.ep).repeat_interleave(
            recv_counts.flatten())
        by_expert = expert_of_row.argsort(stable=True)
        ys = self.compute(rows.index_select(0, by_expert), recv_counts.sum(dim=0))
        back = torch.empty_like(by_expert).scatter_(0, by_expert, torch.arange(len(by_expert), device=x.device))
        ys = all_to_all_single_autograd(ys.index_select(0, back), send_splits, recv_splits, self.group)
        ys = (ys * slot_weights.unsqueeze(-1)).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_slot, ys)


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup) -> list[ExpertParallel]:
    """Replace the routed experts of every MoE layer of `model` by this rank's `ExpertParallel` slice."""
    out = []
    for module in model.modules():
        if isinstance(module, MoE) and not isinstance(module.experts, ExpertParallel):
            module.experts = ExpertParallel(module.experts, group)
            out.append(module.experts)
    return out


def all_to_all_bytes(indices: torch.Tensor, n_experts: int, ep: int, rank: int, hidden: int,
                     bytes_per_value: int = 2, backward: bool = True) -> int:
    """Bytes this rank sends in the all-to-alls of one MoE layer for tokens whose experts are
    `indices` [N, K]: each token goes once to each other EP rank holding at least one of its experts
    (dispatch) and comes back once (combine); twice more in the backward.

    This counts one copy per (token, destination rank) as DeepSeek-V3's dispatch does (a token is
    sent once to a node and fanned out there); `ExpertParallel` itself sends one row per (token,
    expert), which `rows_sent` counts."""
    dest = indices // (n_experts // ep)  # [N, K] rank of each chosen expert
    hit = torch.zeros(indices.shape[0], ep, dtype=torch.bool, device=indices.device)
    hit.scatter_(1, dest, True)
    hit[:, rank] = False
    copies = int(hit.sum())
    return copies * hidden * bytes_per_value * (4 if backward else 2)


def rows_sent(indices: torch.Tensor, n_experts: int, ep: int, rank: int) -> int:
    """Rows `ExpertParallel` sends to other ranks in one dispatch: one per (token, remote expert)."""
    dest = indices // (n_experts // ep)
    return int((dest != rank).sum())


def expected_remote_copies(ep: int, topk_group: int, n_group: int) -> float:
    """Expected number of other EP ranks a token is sent to under node-limited routing, with one
    group of experts per rank (n_group == ep) and the token's `topk_group` groups a uniform choice:
    topk_group - P(its own rank is chosen) = topk_group * (ep - 1) / ep. An upper bound when the
    K experts may all fall into fewer groups than topk_group."""
    if n_group != ep:
        raise ValueError(f"the formula assumes one group per EP rank; got n_group={n_group}, ep={ep}")
    return topk_group * (ep - 1) / ep
