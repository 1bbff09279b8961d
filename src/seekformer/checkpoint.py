"""Hub-layout safetensors checkpoints: load (sharded or not, FP8 or not) and save, atomically.

Layout differences between the hub files and the module tree, handled here only:
- routed experts: hub `mlp.experts.{j}.{gate,up,down}_proj.weight` <-> stacked
  `mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I];
- Multi-Token Prediction: hub `model.layers.{L+k}.*` <-> `mtp.{k}.*`; the hub also stores the MTP
  layer's copies of the embedding and output head (`embed_tokens`, `shared_head.head`), which
  seekformer ties to the main ones: at load they must equal them, at save they are written out;
- FP8: a float8_e4m3fn `weight` with its `weight_scale_inv` (found through the index, in any shard) is
  dequantized into the load dtype on the target device, or kept as FP8 (`keep_fp8=True`);
  `quantization_config` is written exactly when FP8 weights are.

The functions take any module laid out as `Transformer` (`model.*`, `lm_head`, `mtp`, `.config`);
this module does not import the model, the model imports it (`Transformer.from_pretrained` and
`save_pretrained` delegate here).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ModelConfig, fp8_block_size
from .io_utils import atomic_write, atomic_write_text, replace_dir, sibling_temp_dir

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)(_scale_inv)?$")  # FP8 experts: scales
_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
MTP_CHOICES = ("if_present", "require", "skip")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into, or a damaged file."""


@dataclass
class _Target:
    tensor: torch.Tensor  # the parameter (or a view of it) the hub tensor is copied into
    alias: bool = False  # a hub copy of a tied tensor: must equal it, nothing to copy


def _hub_targets(model: nn.Module) -> dict[str, _Target]:
    """Every hub key the model expects, mapped to where its values go."""
    config = model.config
    targets: dict[str, _Target] = {}
    state = model.state_dict(keep_vars=True)
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        hub = _internal_to_hub(name, config)
        match = _EXPERTS.match(name)
        if match:
            prefix, kind, scale = match.groups()
            hub_prefix, weight = _internal_to_hub(prefix, config), "weight" + (scale or "")
            inter = tensor.shape[1] // 2 if kind == "gate_up_proj" else None
            for j in range(tensor.shape[0]):
                if kind == "gate_up_proj":
                    targets[f"{hub_prefix}.{j}.gate_proj.{weight}"] = _Target(tensor.data[j, :inter])
                    targets[f"{hub_prefix}.{j}.up_proj.{weight}"] = _Target(tensor.data[j, inter:])
                else:
                    targets[f"{hub_prefix}.{j}.down_proj.{weight}"] = _Target(tensor.data[j])
        else:
            targets[hub] = _Target(tensor.data)
    for k in range(len(model.mtp)):
        prefix = f"model.layers.{config.num_hidden_layers + k}"
        targets[f"{prefix}.embed_tokens.weight"] = _Target(model.model.embed_tokens.weight.data, alias=True)
        targets[f"{prefix}.shared_head.head.weight"] = _Target(model.lm_head.weight.data, alias=True)
    return targets


def _internal_to_hub(name: str, config: ModelConfig) -> str:
    match = _MTP.match(name)
    if match:
        return f"model.layers.{config.num_hidden_layers + int(match.group(1))}.{match.group(2)}"
    return name


def hub_state_items(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under hub keys, one at a time (expert slices made contiguous, the MTP
    layer's copies of tied tensors cloned: safetensors refuses shared storage)."""
    for key, target in _hub_targets(model).items():
        tensor = target.tensor.detach()
        yield key, tensor.clone() if target.alias else tensor.contiguous()


# ---------------------------------------------------------------------- reading
def _checkpoint_files(directory: Path) -> dict[str, list[str]]:
    """file name -> keys it should hold (from the index if sharded)."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from exc
        files: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            files.setdefault(file, []).append(key)
        for file in files:
            if not (directory / file).is_file():
                raise CheckpointError(f"shard {file} listed in {INDEX_FILE} is missing from {directory}")
        return files
    if (directory / SINGLE_FILE).is_file():
        return {SINGLE_FILE: []}
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    if len(found) == 1:
        return {found[0]: []}
    raise CheckpointError(
        f"no weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE}"
        + (f" (found {found})" if found else "")
    )


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"cannot read {path}: {exc} (truncated or not a safetensors file?)") from exc


def _get(reader, path: Path, key: str) -> torch.Tensor:
    try:
        return reader.get_tensor(key)
    except Exception as exc:
        raise CheckpointError(f"cannot read tensor {key} from {path}: {exc}") from exc


def _read(reader, path: Path, key: str, key_set: set[str], block: tuple[int, int], target: torch.Tensor,
          scale_files: dict[str, str]) -> torch.Tensor:
    """One tensor from an open file, for `target`: an FP8 weight comes back dequantized into the
    target's dtype on its device, unless the target keeps FP8 (then it comes back as stored). Its
    `weight_scale_inv` is read from this file or, through `scale_files` (key -> file), another shard."""
    from .quant.fp8 import FP8_DTYPE, _is_fp8, dequantize_blockwise

    tensor = _get(reader, path, key)
    if _is_fp8(tensor) and tensor.dtype != FP8_DTYPE:
        raise CheckpointError(f"{key} in {path} is {tensor.dtype}: only float8_e4m3fn weights (quantization_config "
                              "fmt 'e4m3', the hub's FP8 format) are supported")
    if target.dtype == FP8_DTYPE:
        if tensor.dtype != FP8_DTYPE:
            raise CheckpointError(f"{key} in {path} is {tensor.dtype}, but the model keeps this weight in FP8 "
                                  "(keep_fp8=True needs an FP8 checkpoint: write one with `seekformer quantize`)")
        return tensor
    if tensor.dtype != FP8_DTYPE:
        return tensor
    scale_key = f"{key}_scale_inv"
    if scale_key in key_set:
        scale = _get(reader, path, scale_key)
    elif scale_key in scale_files:
        with _open(path.parent / scale_files[scale_key]) as other:
            scale = _get(other, path.parent / scale_files[scale_key], scale_key)
    else:
        raise CheckpointError(f"{key} in {path} is FP8 but {scale_key} is missing")
    expected = tuple(-(-n // b) for n, b in zip(tensor.shape, block))
    if tensor.dim() != 2 or tuple(scale.shape) != expected:
        raise CheckpointError(f"{scale_key} has shape {tuple(scale.shape)}, but {key} {tuple(tensor.shape)} in "
                              f"{block[0]}x{block[1]} blocks needs {expected}")
    device = target.device
    return dequantize_blockwise(tensor.to(device), scale.to(device), block, target.dtype)


def load_state_into(model: nn.Module, directory: str | Path, skip_layers: Collection[int] = ()) -> None:
    """Copy a hub-layout checkpoint into `model` (already allocated), checking every key.

    Keys of the hub layers in `skip_layers` (MTP modules left out on purpose, see
    `checkpoint_config`) are neither loaded nor reported; every other difference is an error.
    """
    directory = Path(directory)
    targets = _hub_targets(model)
    block = fp8_block_size(model.config.quantization_config) or (128, 128)
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[str] = []
    aliases: list[tuple[Path, str]] = []  # compared once every main tensor is in place
    files = _checkpoint_files(directory)
    located = {key: file for file, keys in files.items() for key in keys}  # from the index (sharded)
    scale_files = {key: file for key, file in located.items() if key.endswith("_scale_inv")}
    for file in files:
        path = directory / file
        with _open(path) as reader:
            key_set = set(reader.keys())
            for key in sorted(key_set):
                weight_key = key[: -len("_scale_inv")]
                if key not in targets and key.endswith("_scale_inv") and (weight_key in key_set | located.keys()):
                    continue  # consumed with its weight
                if _hub_layer(key) in skip_layers:
                    continue
                target = targets.get(key)
                if target is None:
                    unexpected.append(key)
                    continue
                if target.alias:
                    aliases.append((path, key))
                    continue
                tensor = _read(reader, path, key, key_set, block, target.tensor, scale_files)
                if tuple(tensor.shape) != tuple(target.tensor.shape):
                    mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.tensor.shape)}")
                    continue
                target.tensor.copy_(tensor)
                loaded.add(key)
    unequal = []
    for path, key in aliases:
        with _open(path) as reader:
            tensor = _read(reader, path, key, set(reader.keys()), block, targets[key].tensor, scale_files)
        target = targets[key].tensor  # read on the host: compared where the model lives (CUDA included)
        if not torch.equal(tensor.to(target.device, target.dtype), target):
            unequal.append(key)
    missing = sorted(k for k, t in targets.items() if not t.alias and k not in loaded)
    problems = []
    if missing:
        problems.append(_listing("missing keys", missing))
    if unexpected:
        problems.append(_listing("unexpected keys", sorted(unexpected)))
    if mismatched:
        problems.append(_listing("shape mismatches", mismatched))
    if unequal:
        problems.append(_listing(
            "MTP copies of the embedding/output head that differ from the main ones (seekformer ties them)",
            unequal))
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not match the model:\n" + "\n".join(problems))


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    shown = "\n".join(f"  - {item}" for item in items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}):\n{shown}{more}"


def _hub_layer(key: str) -> int | None:
    match = _LAYER.match(key)
    return int(match.group(1)) if match else None


def checkpoint_keys(directory: str | Path) -> set[str]:
    """Every tensor name a checkpoint holds (from the index, or the single file's header)."""
    directory = Path(directory)
    files = _checkpoint_files(directory)
    if len(files) == 1 and not next(iter(files.values())):  # a single file: read its header
        name = next(iter(files))
        with _open(directory / name) as reader:
            return set(reader.keys())
    return {key for keys in files.values() for key in keys}


def checkpoint_config(directory: str | Path, mtp: str = "if_present") -> tuple[ModelConfig, range]:
    """The config to build for loading `directory`, and the hub layers to skip while loading it.

    `num_nextn_predict_layers` in config.json declares the MTP modules; `mtp` says which to build:
    - "if_present" (default): those whose weights the checkpoint holds, with a warning when some
      are missing (transformers keeps the declaration but never saves the MTP weights);
    - "require": all of them, a `CheckpointError` if any is missing;
    - "skip": none, not even when present (the main model alone; 11.6B parameters fewer on V3).
    The returned config declares the modules actually built.
    """
    if mtp not in MTP_CHOICES:
        raise ValueError(f"mtp must be one of {', '.join(MTP_CHOICES)}, got {mtp!r}")
    directory = Path(directory)
    config = ModelConfig.from_hf(directory)
    declared = config.num_nextn_predict_layers
    first = config.num_hidden_layers
    if mtp == "skip" or (mtp == "if_present" and not declared):
        built = 0
    else:
        layers = {_hub_layer(key) for key in checkpoint_keys(directory)}
        built = 0
        while built < declared and first + built in layers:
            built += 1
        if mtp == "require" and (not declared or built < declared):
            raise CheckpointError(
                f"{directory}: MTP required, but config.json declares {declared} MTP module(s) "
                f"(num_nextn_predict_layers) and the checkpoint holds weights for {built}"
                + (f" (nothing under model.layers.{first + built}.*)" if declared else ""))
        if built < declared:
            warnings.warn(
                f"{directory}: config.json declares {declared} MTP module(s) (num_nextn_predict_layers) but "
                f"the checkpoint holds no weights under model.layers.{first + built}.* (transformers does not "
                f"save them); loaded the main model with {built} MTP module(s)"
                + ("; MTP speculative decoding and MTP training are off" if not built else ""),
                stacklevel=3)
    if built != declared:
        config = config.replace(num_nextn_predict_layers=built)
    return config, range(first + built, first + declared)


def keep_fp8_layers(model: nn.Module, directory: Path) -> None:
    """Swap the hub's FP8 layers of a model built for `directory` (on the meta device) for ones that
    keep FP8 weights, before it is allocated and loaded (`from_pretrained(..., keep_fp8=True)`)."""
    from .quant.fp8_inference import keep_fp8_weights

    block = fp8_block_size(model.config.quantization_config)
    if block is None:
        raise CheckpointError(f"keep_fp8=True needs an FP8 checkpoint, but {directory}/config.json has no "
                              "quantization_config (write one with `seekformer quantize`)")
    keep_fp8_weights(model, block)


# ---------------------------------------------------------------------- writing
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size must be bytes or like '5GB', got {size!r}")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}
    return int(float(match.group(1)) * units[match.group(2)])


def _block_size(model: nn.Module) -> tuple[int, int]:
    return fp8_block_size(model.config.quantization_config) or (128, 128)


def _stored_items(model: nn.Module, fp8: bool, block: tuple[int, int]) -> Iterator[tuple[str, torch.Tensor]]:
    """What `save_pretrained` writes: with `fp8`, FP8 weights (kept ones as they are, the hub's FP8
    layers quantized) with their scales; without, every weight dense, FP8 ones dequantized into the
    dtype of the model's embedding."""
    from .quant.fp8 import FP8_DTYPE, dequantize_blockwise, quantize_state_dict_fp8

    targets = _hub_targets(model)
    dense = model.model.embed_tokens.weight.dtype
    for key, tensor in hub_state_items(model):
        if key.endswith("_scale_inv") and key[: -len("_scale_inv")] in targets:
            if fp8:
                yield key, tensor
        elif tensor.dtype == FP8_DTYPE:
            yield key, tensor if fp8 else dequantize_blockwise(tensor, targets[f"{key}_scale_inv"].tensor, block, dense)
        elif fp8:
            yield from quantize_state_dict_fp8({key: tensor}, block_size=block).items()
        else:
            yield key, tensor


def save_pretrained(
    model: nn.Module,
    directory: str | Path,
    max_shard_size: int | str = "5GB",
    fp8: bool = False,
    tokenizer: Any = None,
) -> Path:
    """Write config.json and safetensors weights in the hub layout (sharded above `max_shard_size`),
    and the tokenizer's files when one is given (a seekformer `Tokenizer`, or any object with
    `save_pretrained(directory)` such as a transformers tokenizer).

    All of it is written into a hidden directory beside `directory`, which then replaces
    `directory` in one step (`io_utils.replace_dir`): a save that fails or is killed at any moment
    leaves the previous checkpoint whole. Files in `directory` that the save does not write (a
    README, a tokenizer when none is given, ...) are carried over; weights of the previous save
    are not. With `fp8=True` the linear projections are stored block-quantized as DeepSeek-V3
    ships them; with `fp8=False` everything is dense (a model kept in FP8 is dequantized).
    `quantization_config` is written exactly when FP8 weights are.
    """
    limit = _parse_size(max_shard_size)
    if tokenizer is not None:
        _check_tokenizer(tokenizer, model.config)
    target = Path(os.path.realpath(directory))
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"cannot save a checkpoint to {target}: it is a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_stagings(target)
    if os.path.ismount(target):
        return _save_into_mount_point(model, target, limit, fp8, tokenizer)
    staging = sibling_temp_dir(target, prefix=f".{target.name}{_STAGING}{os.getpid()}-")
    cwd = os.getcwd()
    try:
        _write_weights(model, staging, limit, fp8)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, staging)
        if target.exists():
            _carry_over(target, staging)
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if cwd == str(target) or cwd.startswith(str(target) + os.sep):
        os.chdir(cwd)  # the process was inside the replaced directory: follow the path to the new one
    return target


_STAGING = ".saving-"
_STAGING_NAME = re.compile(r"^\..+\.saving-(\d+)-[a-z0-9_]{8}$")  # `.{target}.saving-{pid}-{mkdtemp's 8}`


def _save_into_mount_point(model: nn.Module, target: Path, limit: int, fp8: bool, tokenizer: Any) -> Path:
    """A mount point cannot be replaced by a rename: write beside the old files inside it and move
    the new ones in one by one (weights, then index and config), then remove the old weights. Each
    file is replaced atomically, the checkpoint as a whole is not."""
    old_weights = _weight_files(target)
    staging = Path(tempfile.mkdtemp(prefix=_STAGING, dir=target))
    try:
        _write_weights(model, staging, limit, fp8)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, staging)
        written = sorted(p.name for p in staging.iterdir())
        last = [name for name in (INDEX_FILE, "config.json") if name in written]
        for name in [n for n in written if n not in last] + last:
            os.replace(staging / name, target / name)
        for name in old_weights - set(written):
            (target / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_weights(model: nn.Module, directory: Path, limit: int, fp8: bool) -> None:
    """config.json, the safetensors file(s) and, when sharded, the index, into a fresh `directory`."""
    from .quant.fp8 import hub_quantization_config

    block = _block_size(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    wrote_fp8 = False
    for key, tensor in _stored_items(model, fp8, block):
        wrote_fp8 |= tensor.dtype == torch.float8_e4m3fn
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        atomic_write(directory / name, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata={"format": "pt"}))
    if len(shards) > 1:
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(directory / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")
    # quantization_config says FP8 exactly when FP8 weights were written, whatever the model type
    extra = {k: v for k, v in model.config.extra.items() if k != "quantization_config"}
    model.config.replace(quantization_config=hub_quantization_config(block) if wrote_fp8 else None,
                         extra=extra).save(directory)


def _check_tokenizer(tokenizer: Any, config: ModelConfig) -> None:
    if not callable(getattr(tokenizer, "save", None)) and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise TypeError(f"tokenizer must have a save(directory) or save_pretrained(directory) method, "
                        f"got {type(tokenizer).__name__}")
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{config.vocab_size}: not this model's tokenizer?")


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    if callable(getattr(tokenizer, "save_pretrained", None)):
        tokenizer.save_pretrained(str(directory))
    else:
        tokenizer.save(directory)


def _weight_files(directory: Path) -> set[str]:
    """Names of the weight files of the checkpoint in `directory` (replaced, never carried over)."""
    names = {p.name for p in directory.iterdir() if p.name in (SINGLE_FILE, INDEX_FILE) or _SHARD.match(p.name)}
    try:
        names.update(json.loads((directory / INDEX_FILE).read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no index, or a damaged one: its shards have the standard names
    return names


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) into `new` every entry of `old` that the save did not write."""
    skip = _weight_files(old) | {p.name for p in new.iterdir()}
    for entry in old.iterdir():
        if entry.name in skip:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)


def _remove_abandoned_stagings(target: Path) -> None:
    """Delete the staging directories beside `target` of saves whose process no longer runs (killed)."""
    for path in target.parent.glob(f".*{_STAGING}*"):
        match = _STAGING_NAME.match(path.name)
        if match and path.is_dir() and not _process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True
