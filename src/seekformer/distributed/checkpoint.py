"""Distributed checkpoints with `torch.distributed.checkpoint` (DCP): every rank writes its own
shards in parallel, and a checkpoint loads on any number of ranks and any dp x ep split.

`RUN/checkpoints/step_000100/` holds DCP's files (`.metadata`, `__{rank}_0.distcp`), plus
`trainer_state.json` (step, tokens, the sampler's position in the global batch stream, the layout it
was saved with), one `rng_rank_{rank}.safetensors` per rank (that rank's torch CPU and own-GPU,
NumPy and Python generators, as single-process checkpoints hold them) and `manifest.json` (as single-process
checkpoints). It is written to a hidden temp directory and renamed into place by rank 0 after a
barrier; only then does `latest` move.

Routed experts are stored one entry per expert (`...experts.gate_up_proj.{j}`, `[2I, H]`, and the
same for their optimizer moments): each expert lives whole on one rank whatever the split (FSDP
shards the stacked [E, ...] tensor by rows, EP by blocks of rows), so any rank can read the experts
it holds under another layout. Everything else is a DTensor that DCP reshards itself, or a tensor
replicated on every rank (the Engram tables and their SparseAdam state, `engram_optimizer.*`), which
DCP writes once.

`export_checkpoint` reads a checkpoint in one process (no process group) into a plain Transformer
and writes the hub layout that `load_model` and transformers read.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from ..checkpoint import CheckpointError
from ..io_utils import atomic_write, atomic_write_text
from ..model.moe import Experts
from ..training.checkpointing import (
    CHECKPOINTS,
    LATEST,
    STATE_JSON,
    Optimizers,
    _named,
    _prune,
    _python_rng_state,
    _restore_rng,
    _rng_tensors,
    _write_manifest,
    latest_checkpoint,
    publish_dir,
    step_name,
    write_model_dir,
)

FORMAT = "seekformer-dcp-v1"
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
RNG_FILE = "rng_rank_{}.safetensors"


def is_distributed_checkpoint(path: Path) -> bool:
    return (path / ".metadata").is_file()


def _expert_rows(module: Experts, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The local rows of a stacked expert weight (or moment) and the global index of the first one."""
    first = getattr(module, "first", 0)  # ExpertParallel: the first expert of this EP rank
    if isinstance(tensor, DTensor):  # FSDP: rows split as torch.chunk does, over a 1-D mesh
        mesh = tensor.device_mesh
        rows = math.ceil(tensor.shape[0] / mesh.size())
        first += mesh.get_local_rank() * rows
        tensor = tensor.to_local()
    return tensor, first


def _expert_modules(model: nn.Module) -> dict[str, Experts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Experts)}


def _split_experts(flat: dict[str, Any], model: nn.Module, prefix: str = "") -> dict[str, Any]:
    """`flat` (name -> tensor) with every stacked expert weight replaced by one entry per expert: views
    of the same memory, so loading into them loads into the stacked tensor."""
    out = dict(flat)
    for name, module in _expert_modules(model).items():
        for weight in EXPERT_WEIGHTS:
            key = f"{prefix}{name}.{weight}"
            if key not in out:
                continue
            rows, first = _expert_rows(module, out.pop(key))
            for i in range(rows.shape[0]):
                out[f"{key}.{first + i}"] = rows[i]
    return out


def _savable_state(model: nn.Module, optimizers: Optimizers) -> tuple[dict, dict, dict, Callable[[], None]]:
    """(model state, backbone optimizer state, the flat view DCP reads and writes, sharing their memory,
    and a function that copies loaded step counts of replicated optimizers back after `dcp.load`)."""
    optimizers = _named(optimizers)
    model_state = get_model_state_dict(model)
    optim_state = get_optimizer_state_dict(model, optimizers["optimizer"])
    view: dict[str, Any] = {f"model.{k}": v for k, v in _split_experts(model_state, model).items()}
    for fqn, entry in optim_state["state"].items():
        for key, value in entry.items():
            view[f"optim.{key}.{fqn}"] = value
    moments = {k: v for k, v in view.items() if k.startswith(("optim.exp_avg.", "optim.exp_avg_sq."))}
    for key in moments:
        view.pop(key)
    for moment in ("exp_avg", "exp_avg_sq"):
        part = {k[len(f"optim.{moment}."):]: v for k, v in moments.items() if k.startswith(f"optim.{moment}.")}
        view.update({f"optim.{moment}.{k}": v for k, v in _split_experts(part, model).items()})
    write_back = []
    for name, optimizer in optimizers.items():
        if name != "optimizer":
            part, back = _replicated_optimizer_view(model, optimizer, name)
            view.update(part)
            write_back.append(back)
    return model_state, optim_state, view, lambda: [back() for back in write_back]


def _replicated_optimizer_view(model: nn.Module, optimizer: torch.optim.Optimizer,
                               name: str) -> tuple[dict[str, torch.Tensor], Callable[[], None]]:
    """The state of a SparseAdam over parameters replicated on every rank (the Engram tables):
    `{name}.{key}.{fqn}`. An optimizer that has not stepped gets SparseAdam's initial state (step 0,
    zero moments: what its first step would create), so that a checkpoint can load into it. Its step
    counts are Python ints, which the view holds as tensors: the returned function copies loaded
    ones back."""
    fqns = {id(p): n for n, p in model.named_parameters()}
    view: dict[str, torch.Tensor] = {}
    steps = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            if isinstance(param, DTensor) or not isinstance(optimizer, torch.optim.SparseAdam):
                raise TypeError(f"{name}: only a SparseAdam over replicated parameters is saved this way")
            state = optimizer.state[param]
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
            fqn = fqns[id(param)]
            view[f"{name}.exp_avg.{fqn}"] = state["exp_avg"]
            view[f"{name}.exp_avg_sq.{fqn}"] = state["exp_avg_sq"]
            step = view[f"{name}.step.{fqn}"] = torch.tensor(state["step"], dtype=torch.int64)
            steps.append((state, step))

    def write_back():
        for state, step in steps:
            state["step"] = int(step)
    return view, write_back


def _save_rng(directory: Path, rank: int) -> None:
    """This rank's generators (each rank draws its own dropout masks). Of the CUDA generators only
    its own device's (`rng.cuda_device`): restoring every device's would open a context on each GPU
    in every process."""
    tensors = {k: v for k, v in _rng_tensors().items() if not k.startswith("rng.cuda.")}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda_device"] = torch.cuda.get_rng_state()
    meta = {"format": FORMAT, "python_rng": json.dumps(_python_rng_state())}
    atomic_write(directory / RNG_FILE.format(rank), lambda p: save_file(tensors, str(p), metadata=meta))


def _load_rng(path: Path, rank: int, saved_world: int) -> None:
    """Restore the generators of rank `rank` as saved; on another world size, those of rank
    `rank % saved_world` (a run on a different number of ranks draws different masks anyway).
    Checkpoints written before RNG states were saved have none: the generators stay as seeded."""
    file = path / RNG_FILE.format(rank % saved_world)
    if not file.is_file():
        return
    with safe_open(str(file), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        python_state = json.loads(handle.metadata()["python_rng"])
    cuda = tensors.pop("rng.cuda_device", None)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)  # this process's device
    _restore_rng(tensors, python_state)


def save_distributed(run_dir: Path, model: nn.Module, optimizers: Optimizers, state: dict[str, Any],
                     keep_last: int, is_main: bool, tokenizer) -> Path:
    """Every rank: write checkpoint `step_{state['step']}` (DCP), publish it atomically, move `latest`."""
    root = Path(run_dir) / CHECKPOINTS
    name = step_name(state["step"])
    tmp = root / f".tmp-{name}"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    _, _, view, _ = _savable_state(model, optimizers)
    dcp.save(view, checkpoint_id=str(tmp))
    _save_rng(tmp, dist.get_rank())
    dist.barrier()
    if is_main:
        tokenizer.save(tmp)  # with the model config in the state: all that `export` needs
        atomic_write_text(tmp / STATE_JSON, json.dumps({"format": FORMAT, **state}, indent=2) + "\n")
        _write_manifest(tmp)
        publish_dir(tmp, root / name)
        atomic_write_text(root / LATEST, name + "\n")
        _prune(root, keep_last, name)
    dist.barrier()
    return root / name


def load_distributed(path: Path, model: nn.Module, optimizers: Optimizers) -> dict[str, Any]:
    """Every rank: load checkpoint `path` into the (parallelized) model and optimizers, and this rank's
    generators; returns its trainer state."""
    state = read_state(path)
    model_state, optim_state, view, write_back = _savable_state(model, optimizers)
    _check_keys(path, view)
    dcp.load(view, checkpoint_id=str(path))
    set_model_state_dict(model, model_state)
    set_optimizer_state_dict(model, _named(optimizers)["optimizer"], optim_state)
    write_back()
    _load_rng(path, dist.get_rank(), int(state.get("saved_with", {}).get("world", 1)))
    return state


def read_state(path: Path) -> dict[str, Any]:
    state_file = path / STATE_JSON
    if not is_distributed_checkpoint(path) or not state_file.is_file():
        raise CheckpointError(f"{path} is not a distributed checkpoint (no .metadata or {STATE_JSON})")
    state = json.loads(state_file.read_text())
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    return state


def check_same_model(path: Path, state: dict[str, Any], model_config: dict[str, Any]) -> None:
    """A checkpoint of another model: name the config fields (saved in its trainer state) that differ
    from this run's model, including those that change no weight's shape (fewer layers, another
    rope_theta) and would otherwise load without complaint."""
    saved = state.get("model_config", {})
    current = json.loads(json.dumps(model_config))  # as JSON has it: lists, not tuples
    differ = [f"{k} is {saved[k]!r} there, {current[k]!r} here" for k in sorted(saved.keys() & current.keys())
              if saved[k] != current[k]]
    if differ:
        raise CheckpointError(f"{path} holds another model than this run's: " + "; ".join(differ))


def _check_keys(path: Path, view: dict[str, Any]) -> None:
    """A checkpoint of another model: name the weights that are missing or shaped differently."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    missing = [k for k in view if k.startswith("model.") and k not in metadata]
    wrong = [k for k, v in view.items() if k.startswith("model.") and k in metadata
             and hasattr(metadata[k], "size") and tuple(metadata[k].size) != tuple(v.shape)]
    if missing or wrong:
        def some(keys):
            return ", ".join(keys[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = ([f"missing {some(missing)}"] if missing else []) + ([f"shaped differently: {some(wrong)}"]
                                                                       if wrong else [])
        raise CheckpointError(f"{path} holds another model than this run's: " + "; ".join(parts))


def export_run(source: Path, out: Path) -> Path:
    """Write the hub layout of a run's latest distributed checkpoint (or of the checkpoint directory
    `source`) to `out`, in this process: see `export_checkpoint`."""
    source = Path(source)
    if not is_distributed_checkpoint(source):
        path = latest_checkpoint(source)
        if path is None:
            raise CheckpointError(f"{source} holds no checkpoint to export")
        source = path
    return export_checkpoint(source, Path(out))


def export_checkpoint(path: Path, out: Path) -> Path:
    """Load the weights of distributed checkpoint `path` into a plain Transformer of its config (all of
    it in this process's memory) and write the hub layout to `out` (a temp directory renamed)."""
    from ..config import ModelConfig
    from ..model.transformer import Transformer
    from ..tokenizer import load_tokenizer

    state = read_state(path)
    model = Transformer(ModelConfig.from_hf(state["model_config"]))
    tokenizer = load_tokenizer(path)
    view = {f"model.{k}": v for k, v in _split_experts(model.state_dict(), model).items()}
    _check_keys(path, view)
    with warnings.catch_warnings():  # DCP warns that it loads in one process, which is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(view, checkpoint_id=str(path), no_dist=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_model_dir(model, tokenizer, tmp)
    publish_dir(tmp, out)
    return out
