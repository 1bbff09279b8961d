"""`DistributedTrainer`: the single-process `Trainer` over a torchrun job.

What changes against one process, and nothing else:
- the built model is parallelized (`parallelize`: expert parallelism, then FSDP2; activation
  checkpointing, when asked for, is applied before both by `Trainer`);
- each rank reads its share of every global batch (`data.batch_size` is the global batch);
- the step's expert loads (the counts the forwards returned) are summed over all ranks before the
  auxiliary-loss-free bias update, so every rank applies the same update; every `BIAS_CHECK_EVERY`
  steps the biases are compared across ranks and a difference is an error;
- Engram tables are replicated (not FSDP-sharded): their row-sparse gradients are averaged over the
  ranks before clipping, so every rank's SparseAdam takes the same step (checked with the biases);
- gradient clipping uses the global norm of the sharded gradients;
- logged losses are the means over ranks; only rank 0 writes files and prints;
- checkpoints are `torch.distributed.checkpoint` directories (`checkpoint.py`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from ..model.transformer import Transformer
from ..training.optim import engram_tables
from ..training.pretrain import FINAL, Trainer, check_new_run_dir
from ..training.run_config import RunConfig
from .checkpoint import check_same_model, export_run, load_distributed, read_state, save_distributed
from .expert_parallel import apply_expert_parallel
from .fsdp import apply_fsdp, clip_grad_norm_sharded, scale_expert_gradients
from .mesh import ParallelError, build_meshes, check_same_on_all_ranks, init_process_group, resolve_layout
from .replicated import average_row_sparse_gradients, check_replicas_equal

BIAS_CHECK_EVERY = 10


class DistributedTrainer(Trainer):
    """`Trainer` on every rank of the default process group (created from torchrun's environment)."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, progress: bool | None = None,
                 echo: Callable[[str], None] | None = None, _resuming: bool = False):
        rank, world = init_process_group(cfg.parallel.timeout_s)
        self.rank, self.world_size, self.is_main = rank, world, rank == 0
        model_config = cfg.model_config()
        with agreed("the run setup"):
            check_same_on_all_ranks("the run config", json.dumps(cfg.to_dict(), sort_keys=True))
            self.layout = resolve_layout(world, rank, cfg.parallel.dp_shard, cfg.parallel.ep,
                                         model_config.n_routed_experts or 0, cfg.data.batch_size)
            if not _resuming:
                check_new_run_dir(Path(run_dir))
        if not self.is_main:
            progress, echo = False, (lambda msg: None)
        with agreed("building the trainer"):
            super().__init__(cfg, run_dir, progress, echo, _resuming)
        if not self.is_main:  # only rank 0 writes metrics
            self.log.write = self.log.truncate_after = lambda *args: None
        dist.barrier()

    # ------------------------------------------------------------------ the hooks of Trainer
    def parallelize(self, model: Transformer) -> Transformer:
        self.meshes = build_meshes(self.layout, self.device.type)
        if self.layout.ep > 1:
            apply_expert_parallel(model, self.meshes.ep.get_group())
        self.root = apply_fsdp(model, self.meshes, partial(Trainer.losses, self))
        return model

    def losses(self, x, y, mtp_lambda, with_mtp):
        return self.root(x, y, mtp_lambda, with_mtp)

    def reduce_loads(self, loads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if loads:
            names = list(loads)
            stacked = torch.stack([loads[n] for n in names])
            dist.all_reduce(stacked)
            loads = dict(zip(names, stacked.unbind(0)))
        return loads

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        scale_expert_gradients(self.model, self.layout.ep)  # runs right after the step's backward passes
        tables = engram_tables(self.model)
        average_row_sparse_gradients(tables)  # the same on every rank: the replicas step alike
        return clip_grad_norm_sharded(self.model.parameters(), max_norm, replicated=tables)

    def train_step(self):
        scalars, loads = super().train_step()
        losses = [k for k, v in scalars.items() if isinstance(v, torch.Tensor) and k != "grad_norm"]
        if losses:
            stacked = torch.stack([scalars[k] for k in losses])
            dist.all_reduce(stacked)
            scalars.update(zip(losses, (stacked / self.world_size).unbind(0)))
        if self.step == 1 or self.step % BIAS_CHECK_EVERY == 0:
            check_biases_equal(self.moes.values())
            check_replicas_equal(engram_tables(self.model))
        return scalars, loads


    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        sampler = self.sampler.state_dict()  # saved as the position in the global batch stream
        sampler.update(batch_size=sampler["batch_size"] * self.world_size, world_size=1)
        state = {"step": self.step, "tokens": self.tokens, "sampler": sampler,
                 "data_fingerprint": self.train_set.meta.get("fingerprint"),
                 "model_config": self.model_config.to_hf(),
                 "saved_with": {"world": self.world_size, "dp": self.layout.dp, "ep": self.layout.ep}}
        return save_distributed(self.run_dir, self.model, self.optimizers, state, self.cfg.run.keep_last,
                                self.is_main, self.tokenizer)

    def restore(self, checkpoint: Path) -> None:
        with agreed(f"loading {checkpoint}"):
            check_same_model(checkpoint, read_state(checkpoint), self.model_config.to_hf())
            state = load_distributed(checkpoint, self.model, self.optimizers)
            self.check_fingerprint(checkpoint, state)
            sampler = dict(state["sampler"])
            sampler.update(batch_size=sampler["batch_size"] // self.world_size, world_size=self.world_size)
            self.sampler.load_state_dict(sampler)
        self.step, self.tokens = int(state["step"]), int(state["tokens"])

    def save_final(self) -> Path:
        """RUN/final in the hub layout, exported by rank 0 from the checkpoint just saved."""
        final = self.run_dir / FINAL
        if self.is_main:
            export_run(self.run_dir, final)
        dist.barrier()
        return final


def check_biases_equal(moes) -> None:
    """Raise if any router's selection bias differs between ranks (they must never diverge)."""
    biases = [m.gate.e_score_correction_bias for m in moes if m.gate.e_score_correction_bias is not None]
    if not biases:
        return
    local = torch.cat([b.flatten() for b in biases])
    low, high = local.clone(), local.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise ParallelError(f"the routing biases differ between ranks (max difference {float((high - low).max()):.3g})")


class agreed:
    """Run a block on every rank; if it raises on any rank, raise on all of them: the failing ranks
    their own error, the others one naming the first failing rank. So a bad setting fails every
    rank at once with a message, instead of leaving the others waiting in a collective."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        message = f"{kind.__name__}: {exc}" if exc is not None else None
        messages: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed and exc is None:
            rank, first = failed[0]
            raise ParallelError(f"{self.what} failed on rank {rank}: {first}")
        return False
