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
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .io_utils import atomic_write, atomic_write_text
from .model.transformer import Transformer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_EXPERTS = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)(_scale_inv)?$")  # FP8 experts: scales
_MTP = re.compile(r"^mtp\.(\d+)\.(.*)$")


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into, or a damaged file."""


@dataclass
class _Target:
    tensor: torch.Tensor  # the parameter (or a view of it) the hub tensor is copied into
    alias: bool = False  # a hub copy of a tied tensor: must equal it, nothing to copy


def _hub_targets(model: Transformer) -> dict[str, _Target]:
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


def hub_state_items(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
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


def load_state_into(model: Transformer, directory: str | Path) -> None:
    """Copy a hub-layout checkpoint into `model` (already allocated), checking every key."""
    directory = Path(directory)
    targets = _hub_targets(model)
    qc = model.config.quantization_config or {}
    block = tuple(qc.get("weight_block_size", (128, 128)))
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
        if not torch.equal(tensor.to(targets[key].tensor.dtype), targets[key].tensor):
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


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    keep_fp8: bool = False,
) -> Transformer:
    """Build the model described by `path/config.json` and load its safetensors weights.

    The model is created on the meta device and allocated once in `dtype` on `device`; tensors are
    read one at a time from memory-mapped files, so peak memory is about one model plus one tensor.
    FP8 weights are dequantized into `dtype`; with `keep_fp8=True` (an FP8 checkpoint only) they stay
    float8_e4m3fn with their scales and are dequantized block by block inside each product
    (`quant/fp8_inference.py`), about half the weight memory of bf16.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    config = ModelConfig.from_hf(directory)
    with torch.device("meta"):
        model = Transformer(config)
    if keep_fp8:
        _keep_fp8(model, directory)
    model.to(dtype=dtype)
    model.to_empty(device=device)
    with torch.no_grad():
        load_state_into(model, directory)
    model.reset_buffers()
    return model.eval()


def _keep_fp8(model: Transformer, directory: Path) -> None:
    from .quant.fp8 import parse_quantization_config
    from .quant.fp8_inference import keep_fp8_weights

    block = parse_quantization_config(model.config.quantization_config)
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


def _block_size(model: Transformer) -> tuple[int, int]:
    from .quant.fp8 import DEFAULT_BLOCK_SIZE, parse_quantization_config

    return parse_quantization_config(model.config.quantization_config) or DEFAULT_BLOCK_SIZE


def _stored_items(model: Transformer, fp8: bool, block: tuple[int, int]) -> Iterator[tuple[str, torch.Tensor]]:
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
    model: Transformer,
    directory: str | Path,
    max_shard_size: int | str = "5GB",
    fp8: bool = False,
) -> Path:
    """Write config.json and safetensors weights in the hub layout (sharded above `max_shard_size`).

    Every file is written to a temp name and renamed; the index is written last and shards left from
    an earlier save into the same directory are removed only after the new set is complete.
    With `fp8=True` the linear projections are stored block-quantized as DeepSeek-V3 ships them; with
    `fp8=False` everything is dense (a model kept in FP8 is dequantized). `quantization_config` is
    written exactly when FP8 weights are.
    """
    from .quant.fp8 import hub_quantization_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
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
    # quantization_config says FP8 exactly when FP8 weights were written, whatever the model type
    extra = {k: v for k, v in model.config.extra.items() if k != "quantization_config"}
    model.config.replace(quantization_config=hub_quantization_config(block) if wrote_fp8 else None,
                         extra=extra).save(directory)
    if len(shards) > 1:
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(directory / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")
    else:
        (directory / INDEX_FILE).unlink(missing_ok=True)
    for stale in directory.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    return directory
