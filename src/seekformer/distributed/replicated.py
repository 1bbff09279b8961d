"""Parameters replicated on every rank with row-sparse gradients: the Engram tables.

FSDP cannot reduce sparse gradients, so the tables stay out of it (`fsdp.apply_fsdp`) and every rank
holds the whole table. After the backward passes, `average_row_sparse_gradients` replaces each
rank's gradient by the mean over the ranks (the gradient of the mean of the ranks' losses, as FSDP's
average gives the dense weights): the rows each rank looked up are gathered from every rank, in rank
order, and summed where they repeat. Every rank then holds the same coalesced gradient and its
SparseAdam takes the same step, so the replicas stay equal without sending whole tables;
`check_replicas_equal` verifies it now and then.

Communication per step: each rank receives the looked-up rows of every rank (padded to the largest
count), at most `world * tokens_per_rank * (N - 1) * heads` rows of `engram_dim_per_ngram / heads`
values per Engram layer, never the table itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .mesh import ParallelError


def average_row_sparse_gradients(params: list[torch.Tensor]) -> None:
    """Replace the row-sparse gradient of each of `params` by its mean over all ranks (coalesced, the
    same tensor on every rank). A parameter without a gradient on this rank counts as a zero one."""
    world = dist.get_world_size()
    for param in params:
        grad = param.grad
        if grad is None:
            grad = torch.sparse_coo_tensor(torch.empty(1, 0, dtype=torch.long, device=param.device),
                                           param.new_empty(0, *param.shape[1:]), param.shape,
                                           check_invariants=False)
        if not grad.is_sparse:
            raise TypeError("average_row_sparse_gradients needs row-sparse gradients (nn.Embedding(sparse=True))")
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
        counts = [torch.zeros(1, dtype=torch.long, device=rows.device) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([rows.numel()], device=rows.device))
        counts = [int(c) for c in counts]
        longest = max(counts)
        padded_rows = torch.zeros(longest, dtype=rows.dtype, device=rows.device)
        padded_rows[: rows.numel()] = rows
        padded_values = values.new_zeros(longest, *values.shape[1:])
        padded_values[: values.shape[0]] = values
        all_rows = [torch.empty_like(padded_rows) for _ in range(world)]
        all_values = [torch.empty_like(padded_values) for _ in range(world)]
        dist.all_gather(all_rows, padded_rows)
        dist.all_gather(all_values, padded_values)
        rows = torch.cat([r[:n] for r, n in zip(all_rows, counts)])
        values = torch.cat([v[:n] for v, n in zip(all_values, counts)]) / world
        # rows are valid by construction: skip torch's invariant check (and its warning)
        param.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, param.shape,
                                             check_invariants=False).coalesce()


def check_replicas_equal(params: list[torch.Tensor]) -> None:
    """Raise if any of the replicated `params` differs between ranks (compared through a float64
    checksum of each, so the tables themselves are not sent)."""
    if not params:
        return
    local = torch.stack([p.detach().double().sum() for p in params])
    low, high = local.clone(), local.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise ParallelError("the Engram tables differ between ranks (their replicas diverged)")
