"""Training checkpoints: complete, verifiable, atomic.

`RUN/checkpoints/step_000100/` is a hub-layout model directory (config.json, model.safetensors,
tokenizer.json) that `load_model` and transformers read as is, plus:
  trainer_state.json          step, tokens, data position, optimizer hyper-parameters and step counts,
                              Python's RNG state
  trainer_state.safetensors   optimizer moments and the torch (CPU, CUDA) and NumPy RNG states (no pickles)
With several optimizers (the backbone's AdamW `optimizer`, the Engram tables' SparseAdam
`engram_optimizer`) each one's tensors are named `{name}.{param index}.{key}` and its param groups
`{name}_param_groups`; non-tensor state (SparseAdam's integer step) goes to `{name}_scalars`.
  manifest.json               size and SHA-256 of every other file, written last
A checkpoint is assembled in a hidden temp directory and renamed into place; only then is
`RUN/checkpoints/latest` (the directory's name) replaced atomically. A run killed at any moment
leaves `latest` naming a complete checkpoint (or no `latest` before the first one); a file that is
missing, truncated or altered afterwards fails the manifest check with an error naming it.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import CheckpointError, load_state_into, save_pretrained
from ..io_utils import atomic_write, atomic_write_text, replace_dir
from ..model.transformer import Transformer
from ..tokenizer import Tokenizer

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
FORMAT = "seekformer-trainer-v1"


def step_name(step: int) -> str:
    return f"step_{step:06d}"


Optimizers = torch.optim.Optimizer | dict[str, torch.optim.Optimizer]


def _named(optimizers: Optimizers) -> dict[str, torch.optim.Optimizer]:
    """A single optimizer is saved under the name `optimizer` (the format of runs without Engram)."""
    return {"optimizer": optimizers} if isinstance(optimizers, torch.optim.Optimizer) else dict(optimizers)


def save_checkpoint(
    run_dir: str | Path,
    model: Transformer,
    optimizer: Optimizers,
    state: dict[str, Any],
    tokenizer: Tokenizer,
    keep_last: int,
) -> Path:
    """Write checkpoint `step_{state['step']}` and point `latest` at it; keep the newest `keep_last`."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = step_name(state["step"])
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    try:
        write_model_dir(model, tokenizer, tmp)
        tensors: dict[str, torch.Tensor] = {}
        record = {"format": FORMAT, **state}
        for key, opt in _named(optimizer).items():
            opt_tensors, groups, scalars = _optimizer_tensors(opt, key)
            tensors.update(opt_tensors)
            record[f"{key}_param_groups"] = groups
            if scalars:
                record[f"{key}_scalars"] = scalars
        tensors.update(_rng_tensors())
        record["python_rng"] = _python_rng_state()
        atomic_write(tmp / STATE_TENSORS, lambda p: save_file(tensors, str(p), metadata={"format": FORMAT}))
        atomic_write_text(tmp / STATE_JSON, json.dumps(record, indent=2) + "\n")
        _write_manifest(tmp)
        publish_dir(tmp, root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, name + "\n")
    _prune(root, keep_last, name)
    return root / name


def write_model_dir(model: Transformer, tokenizer: Tokenizer, directory: Path) -> None:
    """The hub layout: config.json + model.safetensors + tokenizer.json/tokenizer_config.json."""
    save_pretrained(model, directory)
    tokenizer.save(directory)


def publish_dir(tmp: Path, final: Path) -> None:
    """Put the finished directory `tmp` at `final`, replacing an older `final` (e.g. one left by a run
    killed before it could point `latest` at it) in one atomic swap where the system allows it."""
    replace_dir(tmp, final)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, verified against its manifest; None before the first save."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not name or not path.is_dir():
        raise CheckpointError(f"{pointer} names checkpoint {name!r}, but {path} does not exist")
    verify_checkpoint(path)
    return path


def verify_checkpoint(path: Path) -> None:
    """Check every file of a checkpoint against manifest.json: present, same size, same SHA-256."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no {MANIFEST} (interrupted while saving?)")
    try:
        manifest = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path} is damaged ({exc})") from exc
    for file, expected in manifest.items():
        target = path / file
        if not target.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {file}")
        size = target.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"checkpoint file {target} has {size} bytes, the manifest says "
                                  f"{expected['bytes']} (truncated or overwritten)")
        if _sha256(target) != expected["sha256"]:
            raise CheckpointError(f"checkpoint file {target} is corrupted (SHA-256 differs from {MANIFEST})")


def load_checkpoint(path: Path, model: Transformer, optimizer: Optimizers) -> dict[str, Any]:
    """Restore model weights (and router biases), optimizer(s) and RNG states; return trainer_state.json."""
    try:
        state = json.loads((path / STATE_JSON).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path / STATE_JSON} ({exc})") from exc
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path / STATE_JSON}: not a seekformer trainer state (format {state.get('format')!r})")
    with torch.no_grad():
        load_state_into(model, path)
    model.reset_buffers()
    try:
        tensors = load_file(str(path / STATE_TENSORS))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"cannot read {path / STATE_TENSORS}: {exc}") from exc
    for name, opt in _named(optimizer).items():
        if f"{name}_param_groups" not in state:
            raise CheckpointError(f"{path} holds no state for {name} (saved by a run without it: a model "
                                  f"without Engram layers?)")
        _load_optimizer(opt, name, tensors, state[f"{name}_param_groups"], state.get(f"{name}_scalars", {}), path)
    _restore_rng(tensors, state.get("python_rng"))
    return state


# ---------------------------------------------------------------------------- pieces
def _optimizer_tensors(
    optimizer: torch.optim.Optimizer, prefix: str
) -> tuple[dict[str, torch.Tensor], list[dict], dict[str, int | float]]:
    """Optimizer state as flat tensors `{prefix}.{param index}.{key}`, its JSON param groups, and the
    non-tensor state values (`{param index}.{key}` -> number, e.g. SparseAdam's step count)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in sd["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value.detach().cpu().contiguous()
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                scalars[f"{index}.{key}"] = value
            else:
                raise TypeError(f"{prefix} state {index}.{key} is neither a tensor nor a number "
                                f"({type(value).__name__})")
    return tensors, sd["param_groups"], scalars


def _load_optimizer(optimizer: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor],
                    groups: list[dict], scalars: dict[str, int | float], path: Path) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in scalars.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{prefix} state in {path} does not match the model ({exc})") from exc


def _rng_tensors() -> dict[str, torch.Tensor]:
    """torch's CPU and CUDA generator states, and NumPy's global MT19937 state (key, position, and the
    cached Gaussian as `rng.numpy.extra` = [pos, has_gauss, cached_gaussian])."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    if kind == "MT19937":
        out["rng.numpy.key"] = torch.from_numpy(key.astype(np.int64))
        out["rng.numpy.extra"] = torch.tensor([pos, has_gauss, gauss], dtype=torch.float64)
    return out


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _restore_rng(tensors: dict[str, torch.Tensor], python_state: list | None) -> None:
    """Restore every generator the checkpoint holds (checkpoints of older versions hold only torch's)."""
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if "rng.numpy.key" in tensors:
        pos, has_gauss, gauss = tensors["rng.numpy.extra"].tolist()
        key = tensors["rng.numpy.key"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", key, int(pos), int(has_gauss), gauss))
    if python_state is not None:
        version, internal, gauss = python_state
        random.setstate((version, tuple(internal), gauss))


def _write_manifest(directory: Path) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    atomic_write_text(directory / MANIFEST, json.dumps({"format": FORMAT, "files": files}, indent=2) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _prune(root: Path, keep_last: int, current: str) -> None:
    """Remove all but the newest `keep_last` checkpoints (never `current`) and stale temp dirs."""
    steps = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")),
                   key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else -1)
    for old in steps[:-keep_last]:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(".*old-*"):  # directories a replaced checkpoint was renamed to
        shutil.rmtree(stale, ignore_errors=True)
