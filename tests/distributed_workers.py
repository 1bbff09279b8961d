"""Worker functions of the distributed tests, run in spawned processes (importable by name)."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")


def rewound_copy(run: Path, dest: Path, keep: str = "step_000002", drop: str = "step_000004") -> Path:
    """A copy of the finished run `run` at `dest`, as if it had stopped after checkpoint `keep`."""
    from seekformer.training.checkpointing import CHECKPOINTS, LATEST

    shutil.copytree(run, dest)
    (dest / CHECKPOINTS / LATEST).write_text(f"{keep}\n")
    shutil.rmtree(dest / CHECKPOINTS / drop)
    return dest


def run_cli(*args: str, torchrun: bool = False, timeout: float = 150) -> subprocess.CompletedProcess:
    """`python -m seekformer ARGS`, or the same under `torchrun --nproc-per-node 2`; fails on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"] if torchrun \
        else [sys.executable]
    result = subprocess.run([*launcher, "-m", "seekformer", *args], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def launch(fn, world: int, args: tuple, timeout: float = 120.0) -> list:
    """Run fn(rank, world, *args) on `world` spawned processes joined by gloo; return each rank's result.
    A rank that raises re-raises here with its traceback; a job past `timeout` is killed."""
    import multiprocessing as mp
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_run, args=(fn, rank, world, port, args, queue)) for rank in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=timeout)
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def _run(fn, rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import faulthandler
    faulthandler.dump_traceback_later(int(os.environ.get("SEEKFORMER_TEST_DUMP_S", "100")), exit=True)
    try:
        # plain pickle bytes: the queue's own pickler would pass tensors through shared memory that
        # dies with this process
        queue.put((rank, True, pickle.dumps(fn(rank, world, *args))))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def full_state(trainer, grads: bool = False) -> dict[str, torch.Tensor]:
    """The whole model's weights, or their gradients (experts of every EP rank stacked), gathered on
    every rank."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from seekformer.distributed.expert_parallel import ExpertParallel

    out = {}
    for name, module in trainer.model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if grads:
                p = p.grad
                if p is None:
                    continue
            t = p.full_tensor() if isinstance(p, DTensor) else p.detach()
            if isinstance(module, ExpertParallel) and module.ep > 1:
                parts = [torch.empty_like(t) for _ in range(module.ep)]
                dist.all_gather(parts, t.contiguous(), group=module.group)
                t = torch.cat(parts)
            out[f"{name}.{pname}"] = t.clone()
    return out


def train_steps(rank, world, cfg_dict, run_dir, steps, save_at=None):
    """DistributedTrainer for `steps` steps (saving a checkpoint after step `save_at`): per-step losses
    and grad norms, final weights and biases, the first step's gradients."""
    from seekformer.distributed.trainer import DistributedTrainer
    from seekformer.training.run_config import RunConfig

    trainer = DistributedTrainer(RunConfig.from_dict(cfg_dict), run_dir, progress=False)
    first_grads = record_first_gradients(trainer, lambda: full_state(trainer, grads=True))
    history = _steps(trainer, steps, save_at)
    return history, full_state(trainer), _biases(trainer), first_grads


def resume_steps(rank, world, run_dir, overrides, steps):
    """Resume the run in `run_dir` on this world (with `overrides`) and run `steps` more steps: their
    history, the final weights and biases."""
    from seekformer.distributed.trainer import DistributedTrainer

    trainer = DistributedTrainer.resume(run_dir, overrides, progress=False)
    history = _steps(trainer, steps)
    return history, full_state(trainer), _biases(trainer)


def interrupted_and_resumed(rank, world, cfg_dict, run_dir, steps, save_at):
    """`steps` steps saving after step `save_at`, then the run resumed from that checkpoint in this
    process (as a fresh process would: the trainer reseeds the generators) up to `steps` again:
    (uninterrupted history, its final weights, resumed history, resumed final weights)."""
    from seekformer.distributed.trainer import DistributedTrainer
    from seekformer.training.run_config import RunConfig

    trainer = DistributedTrainer(RunConfig.from_dict(cfg_dict), run_dir, progress=False)
    history = _steps(trainer, steps, save_at)
    state = full_state(trainer)
    del trainer
    resumed = DistributedTrainer.resume(run_dir, progress=False)
    assert resumed.step == save_at
    return history, state, _steps(resumed, steps - save_at), full_state(resumed)


def _steps(trainer, steps, save_at=None) -> list[dict]:
    history = []
    for _ in range(steps):
        scalars, loads = trainer.train_step()
        history.append({k: float(v) for k, v in scalars.items()} | {"loads": {k: v.tolist() for k, v in loads.items()}})
        if trainer.step == save_at:
            trainer.save()
    return history


def _biases(trainer) -> dict[str, torch.Tensor]:
    return {n: m.gate.e_score_correction_bias.clone() for n, m in trainer.moes.items()}


def record_first_gradients(trainer, gather) -> dict:
    """Fill the returned dict with `gather()` taken in the first step, after the backward passes and
    the clipping, before the optimizer step."""
    out: dict = {}
    clip = trainer.clip_gradients

    def recording(max_norm):
        norm = clip(max_norm)
        if not out:
            out.update(gather())
        return norm

    trainer.clip_gradients = recording
    return out


def bad_inputs(rank, world, cfg_dict, run_dir):
    """Each bad input on 2 ranks: the error each rank raised (type name and message)."""
    import copy

    from seekformer.distributed.trainer import DistributedTrainer
    from seekformer.training.run_config import RunConfig

    def error_of(make):
        try:
            make()
        except Exception as exc:  # noqa: BLE001 - the test looks at which error it was
            return f"{type(exc).__name__}: {exc}"
        return None

    out = {}
    mismatched = copy.deepcopy(cfg_dict)
    mismatched["optim"]["lr"] *= 1 + rank
    out["mismatch"] = error_of(lambda: DistributedTrainer(RunConfig.from_dict(mismatched), f"{run_dir}/a"))
    too_many = copy.deepcopy(cfg_dict)
    too_many["parallel"]["ep"] = 4
    out["ep"] = error_of(lambda: DistributedTrainer(RunConfig.from_dict(too_many), f"{run_dir}/b"))
    trainer = DistributedTrainer(RunConfig.from_dict(cfg_dict), f"{run_dir}/c", progress=False)
    checkpoint = trainer.save()
    for name, change in (("other_experts", {"n_routed_experts": 4}), ("other_layers", {"num_hidden_layers": 1})):
        other = copy.deepcopy(cfg_dict)
        other["model"].update(change)
        other_trainer = DistributedTrainer(RunConfig.from_dict(other), f"{run_dir}/{name}", progress=False)
        out[name] = error_of(lambda: other_trainer.restore(checkpoint))  # noqa: B023 - called at once
    trainer.train_step()
    checkpoints = trainer.run_dir / "checkpoints"
    if rank == 1:  # this rank dies while writing the step-1 checkpoint (its shards written, not its RNG)
        import seekformer.distributed.checkpoint as ckpt

        def die(*args):
            raise RuntimeError("rank 1 died")
        ckpt._save_rng = die
        error_of(trainer.save)
        return out  # and leaves the group: rank 0 must fail, not wait, and publish nothing
    import time

    start = time.perf_counter()
    out["crash"] = error_of(trainer.save)
    out["crash_seconds"] = time.perf_counter() - start
    out["latest"] = (checkpoints / "latest").read_text().strip()
    out["published"] = sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith("."))
    return out
