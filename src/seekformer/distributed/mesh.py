"""The process group and the device mesh: `world = dp_shard * ep` ranks.

Rank r sits at mesh coordinates (r // ep, r % ep) of a 2-D mesh named ("dp", "ep"): the ep ranks
of one expert-parallel group are consecutive, so on GPUs they share a node (NVLink) when ep divides
the processes per node. Every rank reads different data (the data-parallel degree of the batch is
the whole world); dense weights are sharded over all ranks; routed experts are split over "ep" and
sharded over "dp".
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


class ParallelError(ValueError):
    """A parallel layout that cannot work: sizes that do not divide, or ranks that disagree."""


@dataclass(frozen=True)
class Layout:
    """How the world is split: `dp` data-parallel shards times `ep` expert-parallel ranks."""

    world: int
    rank: int
    dp: int
    ep: int

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_layout(world: int, rank: int, dp_shard: int, ep: int, n_experts: int, batch_size: int) -> Layout:
    """Check `[parallel]` against the world size, the experts and the global batch.

    `dp_shard` 0 means "the rest": world // ep. The global batch (`data.batch_size` sequences) is
    split evenly over all ranks."""
    if ep < 1 or dp_shard < 0:
        raise ParallelError(f"parallel.ep must be >= 1 and parallel.dp_shard >= 0 (0 = automatic); got ep={ep}, "
                            f"dp_shard={dp_shard}")
    if ep > world:
        raise ParallelError(f"parallel.ep={ep} is larger than the world size {world}")
    if world % ep:
        raise ParallelError(f"parallel.ep={ep} does not divide the world size {world}")
    dp = dp_shard or world // ep
    if dp * ep != world:
        raise ParallelError(f"parallel.dp_shard={dp_shard} times parallel.ep={ep} is {dp * ep}, not the world "
                            f"size {world}")
    if ep > 1 and (n_experts == 0 or n_experts % ep):
        raise ParallelError(f"parallel.ep={ep} does not divide the model's {n_experts} routed experts")
    if batch_size % world:
        raise ParallelError(f"the world size {world} does not divide the global batch data.batch_size={batch_size}")
    return Layout(world, rank, dp, ep)


def init_process_group(timeout_s: float = 300.0) -> tuple[int, int]:
    """Join (or create) the default process group from torchrun's environment; returns (rank, world).

    gloo on CPU, NCCL when CUDA is available. The timeout bounds every collective, so a rank that
    died makes the others fail instead of waiting forever. Without torchrun's variables (a plain
    `seekformer train`) this is a group of one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Meshes:
    world: DeviceMesh  # 1-D over all ranks: dense weights
    dp: DeviceMesh  # the ranks holding the same experts: expert weights are sharded over it
    ep: DeviceMesh  # the ranks that split the experts: tokens are exchanged within it


def build_meshes(layout: Layout, device_type: str) -> Meshes:
    mesh = init_device_mesh(device_type, (layout.dp, layout.ep), mesh_dim_names=("dp", "ep"))
    return Meshes(world=mesh._flatten("world"), dp=mesh["dp"], ep=mesh["ep"])


def check_same_on_all_ranks(what: str, value: str) -> None:
    """Raise on every rank if `value` (say, the JSON of the run config) differs between ranks."""
    values: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise ParallelError(f"{what} differs between ranks: rank(s) {', '.join(map(str, differ))} disagree "
                            "with rank 0 (launch every rank with the same config)")
