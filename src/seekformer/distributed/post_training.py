"""Data-parallel post-training: `DistributedSFTTrainer` and `DistributedGRPOTrainer`, the one-process
trainers of `training/sft.py` and `training/grpo.py` over a torchrun job, with the same pieces as
`DistributedTrainer` (process group, mesh, FSDP2, sharded clipping, DCP checkpoints, `agreed`).

What changes against one process, and nothing else:
- the policy is sharded with FSDP2 over all ranks (data parallel only: `parallel.ep` must be 1);
- each rank takes its share of every global batch (SFT: `data.batch_size` rows of each micro-batch;
  GRPO: `grpo.prompts_per_step` prompts, each with its G completions, so advantages stay local);
- sums that normalise the loss (assistant tokens; GRPO's active tokens, sequences, micro-batches)
  are summed over ranks first, and each rank's loss is scaled by the world size because FSDP
  averages the gradients: the update is the one-process update on the same global batch;
- logged sums and expert loads are summed over ranks; only rank 0 writes files and prints;
- checkpoints are `torch.distributed.checkpoint` directories; `final/` is exported by rank 0.

GRPO generates with an unsharded copy of the policy on every rank (gathered from the shards before
each step's rollouts): generation runs no collective, so ranks may stop at different lengths.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..model.packed_weights import pack_for_decode
from ..model.transformer import Transformer
from ..training.grpo import GRPOTrainer, Rollout
from ..training.grpo_config import GRPOConfig
from ..training.sft import SFTConfig, SFTTrainer
from .checkpoint import export_run, load_distributed, save_distributed
from .fsdp import apply_fsdp, clip_grad_norm_sharded
from .mesh import Layout, ParallelError, build_meshes, check_same_on_all_ranks, init_process_group
from .trainer import agreed


def data_parallel_layout(world: int, rank: int, dp_shard: int, ep: int, command: str) -> Layout:
    """Post-training runs are data parallel over the whole world; anything else is refused by name."""
    if ep != 1:
        raise ParallelError(f"parallel.ep={ep}: expert parallelism is not offered for `seekformer {command}` (its "
                            "generation and loss run whole models per rank); use data parallelism (parallel.ep=1)")
    if dp_shard not in (0, world):
        raise ParallelError(f"parallel.dp_shard={dp_shard} is not the world size {world} (`seekformer {command}` "
                            "is data parallel over all ranks; leave it 0)")
    return Layout(world, rank, world, 1)


class DataParallel:
    """The parts the distributed SFT and GRPO trainers share (a mixin before the one-process trainer)."""

    command = ""
    loss_function: Callable  # the trainer method FSDP's root gathers and reduces around

    def _join(self, cfg) -> None:
        rank, world = init_process_group(cfg.parallel.timeout_s)
        self.rank, self.world_size, self.is_main = rank, world, rank == 0
        with agreed("the run setup"):
            check_same_on_all_ranks("the run config", json.dumps(cfg.to_dict(), sort_keys=True))
            self.layout = data_parallel_layout(world, rank, cfg.parallel.dp_shard, cfg.parallel.ep, self.command)

    def _quiet_other_ranks(self, progress, echo):
        if self.is_main:
            return progress, echo
        return False, (lambda msg: None)

    def _after_init(self) -> None:
        if not self.is_main:  # only rank 0 writes metrics
            self.log.write = self.log.truncate_after = lambda *args: None
        dist.barrier()

    def parallelize(self, model: Transformer) -> Transformer:
        if self.world_size > 1 and model.engram_layers():
            raise ParallelError(f"Engram layers are not supported in multi-process `seekformer {self.command}` runs")
        self.meshes = build_meshes(self.layout, self.device.type)
        self.root = apply_fsdp(model, self.meshes, partial(type(self).loss_function, self))
        return model

    def reduce_sums(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every value summed over all ranks, in one all-reduce (float64: exact for counts below 2^53)."""
        if not values:
            return values
        values = {k: torch.as_tensor(v) for k, v in values.items()}
        flat = torch.cat([v.reshape(-1).to(self.device, torch.float64) for v in values.values()])
        dist.all_reduce(flat)
        out, at = {}, 0
        for key, value in values.items():
            out[key] = flat[at: at + value.numel()].view(value.shape).to(value.dtype)
            at += value.numel()
        return out

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_sharded(self.model.parameters(), max_norm)

    def out_of_time(self, deadline: float) -> bool:
        if deadline == math.inf:
            return False
        late = torch.tensor(float(time.perf_counter() >= deadline), device=self.device)
        dist.all_reduce(late, op=dist.ReduceOp.MAX)
        return bool(late)

    @torch.no_grad()
    def copy_policy_into(self, model: Transformer) -> Transformer:
        """Copy the sharded policy's whole state (weights and buffers) into the unsharded `model` on
        every rank, gathering one tensor at a time (an all-gather every rank joins)."""
        sharded = self.model.state_dict()
        for name, value in model.state_dict().items():
            source = sharded[name]
            value.copy_(source.full_tensor() if isinstance(source, DTensor) else source)
        return model

    def _save(self, state: dict[str, Any]) -> Path:
        state = {**state, "model_config": self.model.config.to_hf(), "saved_with": {"world": self.world_size}}
        return save_distributed(self.run_dir, self.model, self.optimizer, state, self.cfg.run.keep_last,
                                self.is_main, self.tokenizer)

    def _load(self, checkpoint: Path) -> dict[str, Any]:
        with agreed(f"loading {checkpoint}"):
            return load_distributed(checkpoint, self.model, self.optimizer)

    def save_final(self) -> Path:
        """RUN/final in the hub layout, exported by rank 0 from the checkpoint just saved."""
        final = self.run_dir / "final"
        if self.is_main:
            export_run(self.run_dir, final)
        dist.barrier()
        return final


class DistributedSFTTrainer(DataParallel, SFTTrainer):
    """`SFTTrainer` on every rank of the default process group (created from torchrun's environment)."""

    command = "sft"
    loss_function = SFTTrainer.losses

    def __init__(self, cfg: SFTConfig, run_dir: str | Path, progress: bool | None = None,
                 echo: Callable[[str], None] | None = None, _resuming: bool = False):
        self._join(cfg)
        progress, echo = self._quiet_other_ranks(progress, echo)
        with agreed("building the SFT trainer"):
            super().__init__(cfg, run_dir, progress, echo, _resuming)
        self._after_init()

    def losses(self, batch):
        return self.root(batch)

    def restore(self, checkpoint: Path) -> None:
        state = self._load(checkpoint)
        with agreed(f"resuming from {checkpoint}"):
            self._continue_from(checkpoint, state)

    def save(self) -> Path:
        return self._save({"step": self.step, "tokens": self.tokens, "batches": self.batches.state_dict(),
                           "data_fingerprint": self.fingerprint})


class DistributedGRPOTrainer(DataParallel, GRPOTrainer):
    """`GRPOTrainer` on every rank of the default process group: each rank rolls out its share of the
    step's prompts with its own sampling seed (so completions differ from a one-process run's; the
    update given the same completions is the same)."""

    command = "grpo"
    loss_function = GRPOTrainer._logprobs

    def __init__(self, cfg: GRPOConfig, run_dir: str | Path, progress: bool | None = None,
                 echo: Callable[[str], None] | None = None, _resuming: bool = False):
        self._join(cfg)
        progress, echo = self._quiet_other_ranks(progress, echo)
        with agreed("the run setup"):
            if cfg.grpo.prompts_per_step % self.world_size:
                raise ParallelError(f"the world size {self.world_size} does not divide grpo.prompts_per_step="
                                    f"{cfg.grpo.prompts_per_step} (each rank rolls out whole groups)")
        with agreed("building the GRPO trainer"):
            super().__init__(cfg, run_dir, progress, echo, _resuming)
        self._after_init()

    def _logprobs(self, model, *args, **kwargs):
        if model is self.model:  # the sharded policy: through FSDP's root
            return self.root(model, *args, **kwargs)
        return GRPOTrainer._logprobs(self, model, *args, **kwargs)

    # ------------------------------------------------------------------ rollouts
    def _sync_rollout_model(self) -> None:
        """Done once per step in `_collect_rollouts` (an all-gather every rank joins)."""

    def _collect_rollouts(self):
        self.copy_policy_into(self.rollout_model)
        pack_for_decode(self.rollout_model)
        return super()._collect_rollouts()

    def local_prompts(self, examples: list):
        per_rank = len(examples) // self.world_size
        return examples[self.rank * per_rank: (self.rank + 1) * per_rank]

    def rollout_seed(self, seed: int) -> int:
        return (seed + 1_000_003 * self.rank) % (2 ** 62)

    def gather_rollout(self, r: Rollout) -> Rollout:
        parts: list[Rollout | None] = [None] * self.world_size
        dist.all_gather_object(parts, r)
        return Rollout.concat(parts)

    def merge_over_ranks(self, parts: dict) -> dict:
        gathered: list[dict | None] = [None] * self.world_size
        dist.all_gather_object(gathered, parts)
        return {k: v for part in gathered for k, v in part.items()}

    def gather_rows(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        parts: list[torch.Tensor | None] = [None] * self.world_size
        dist.all_gather_object(parts, t.cpu())
        offset = sum(len(p) for p in parts[:self.rank])
        return torch.cat(parts).to(t.device), offset

    def _chunks(self, B: int) -> list[slice]:
        """This rank's micro-batches, padded with empty ones to the most any rank has (FSDP's
        collectives run once per micro-batch on every rank)."""
        chunks = super()._chunks(B)
        most = torch.tensor(len(chunks), device=self.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return chunks + [slice(B, B)] * (int(most) - len(chunks))

    # ------------------------------------------------------------------ evaluation and checkpoints
    def eval_model(self) -> Transformer:
        return self.copy_policy_into(Transformer(self.model.config).to(self.device)).eval()

    def restore(self, checkpoint: Path) -> None:
        state = self._load(checkpoint)
        self._continue_from(checkpoint, state)

    def save(self) -> Path:
        return self._save({"step": self.step, "task": self.task.state_dict(), "eval_before": self.eval_before})
