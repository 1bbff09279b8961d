"""FSDP2 (`fully_shard`) over the meshes of `mesh.Meshes`, applied to a built Transformer.

- each routed `ExpertParallel` module is sharded over the "dp" mesh (its weights differ between EP
  ranks, so it cannot share a group with the rest); its gradients are divided by the whole world
  size rather than dp, because every rank's tokens reach it through the all-to-all;
- each decoder block and MTP block is sharded over all ranks (what is left in it once its experts are
  managed); an MTP block stays gathered from its forward to its backward, because the loss applies
  its shared head's norm outside its forward;
- Engram tables stay out of FSDP (`ignored_params`): their gradients are row-sparse, which FSDP
  cannot reduce; they are replicated, and the trainer averages their gradients itself
  (`replicated.average_row_sparse_gradients`);
- the rest (embedding, final norm, output head) by a root wrapper, `LossForward`: the training loss
  reads the output head's weight directly rather than calling the module, so the root's gathering
  has to happen around the whole loss computation.

Compute precision is the run's autocast, as in one process (parameters, gradient reduction and
optimizer state stay float32); `mixed_precision` gives FSDP's own policy (bf16 parameters and
compute, fp32 reduction) for runs that ask for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..training.optim import engram_tables
from .expert_parallel import ExpertParallel
from .mesh import Meshes


class LossForward(nn.Module):
    """A root module whose forward is `loss_fn(*args)`: what FSDP gathers and reduces around."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, *args, **kwargs):
        return self._loss_fn(*args, **kwargs)


def apply_fsdp(model: nn.Module, meshes: Meshes, loss_fn: Callable, mixed_precision: bool = False) -> LossForward:
    """Shard `model` in place (experts, blocks, then the root); returns the root to call for losses."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    replicated = set(engram_tables(model))
    for module in model.modules():
        if isinstance(module, ExpertParallel):
            fully_shard(module, mesh=meshes.dp, mp_policy=policy)  # averaged over dp; see scale_expert_gradients
    for block in model.model.layers:
        fully_shard(block, mesh=meshes.world, mp_policy=policy, ignored_params=replicated)
    for block in model.mtp:  # its shared head's norm is used after its forward: kept gathered until backward
        fully_shard(block, mesh=meshes.world, mp_policy=policy, reshard_after_forward=False)
    root = LossForward(model, loss_fn)
    fully_shard(root, mesh=meshes.world, mp_policy=policy, reshard_after_forward=False, ignored_params=replicated)
    return root


def scale_expert_gradients(model: nn.Module, ep: int) -> None:
    """Divide the routed experts' dp-averaged gradients by ep: the mean over all ranks' losses.
    (FSDP's own divide factor would do it in the reduction, but gloo has no pre-scaled sum.)"""
    grads = [p.grad for m in model.modules() if isinstance(m, ExpertParallel) for p in m.parameters()
             if p.grad is not None]
    if grads and ep > 1:
        torch._foreach_mul_([g.to_local() if isinstance(g, DTensor) else g for g in grads], 1.0 / ep)


def clip_grad_norm_sharded(parameters, max_norm: float, replicated=()) -> torch.Tensor:
    """Clip the global L2 norm of sharded gradients; return the norm before clipping.

    Every element of every sharded parameter lives on exactly one rank (FSDP shards are disjoint;
    experts of different EP ranks are different experts), so the global squared norm is the sum over
    ranks of the local shards' squared norms. The `replicated` parameters (Engram tables) hold the
    same coalesced row-sparse gradient on every rank: counted once, through their values."""
    skip = {id(p) for p in replicated}
    grads = [p.grad for p in parameters if p.grad is not None and id(p) not in skip]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    device = local[0].device if local else torch.device("cpu")
    squares = torch.stack([g.float().pow(2).sum() for g in local]).sum() if local else torch.zeros((), device=device)
    dist.all_reduce(squares)
    values = [p.grad._values() for p in replicated if p.grad is not None]
    for v in values:
        squares = squares + v.float().pow(2).sum().to(device)
    total = squares.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(local + values, coef.to(device))
    return total
