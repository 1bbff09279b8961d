"""bf16 weights packed once for oneDNN's matrix products on CPU, for decoding.

A bf16 matrix product on CPU (oneDNN) first reorders its weight into the blocked layout that the
bf16 dot-product instructions read, on every call. For the few rows of a decode step that reorder
is most of the cost: 43 expert products of [6, 512] x [512, 512] (a decode step of 32 rows over 64
experts, weights not in cache) took 14.8 ms as plain `mm` and 3.5 ms on weights packed beforehand
(2-core CPU, 1 thread, shared machine; `torch.ops.mkldnn._linear_pointwise`, the op PyTorch's own
compiler uses for frozen CPU weights).

`generate` packs a bf16 CPU model on its first call (`pack_for_generation`: when the packs fit in a
quarter of the memory available) and keeps the packs for later calls: at 4,096 cached tokens of the
V3-shaped benchmark model a decode step ran 1.14x faster packed, and the prefill as fast as before;
packing its 100 MB of weights takes ~0.1 s, so packing per call would pay off only after ~30 steps.

`pack_for_decode(model)` packs every `nn.Linear` weight and every routed expert's two weights of a
bf16 CPU model; their products then read the packed copy (`packed_linear`). On CPUs with
AVX512-BF16 the packs are in the layout of the few-row kernel of `bf16_rows.py` (no per-call setup:
all routed experts of a layer in one call; repacking writes over the previous packs' memory), for
products of up to `bf16_rows.MAX_ROWS` rows; more rows (a prefill) take oneDNN's plain product. A packed copy is used
only while its weight is unchanged: it remembers the weight's storage and version counter, so any
in-place update autograd tracks (`load_state_dict`, `copy_`, a foreach optimizer's step, GRPO's refresh
of its rollout copy; `build_optimizer`'s fused AdamW marks its steps) sends the
products back to the plain path until `pack_for_decode` is called again. Writes it cannot see
(`.data`, torch's fused optimizers, which leave version counters alone) need `release_packs(model)`
afterwards. Only without autograd (decode runs under inference mode): a packed product has no
backward. Costs one more copy of the packed weights (2 bytes per parameter) until `release_packs(model)`.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from . import bf16_rows

ROW_HINT = 32  # rows oneDNN is told to expect: any count works, this one tunes the layout for decode

# id(weight) -> (the weight, its version and storage when packed, the packs); an entry goes with its weight.
# The packs: one tensor in `bf16_rows`' layout ([E, ...] for stacked experts) where that kernel runs,
# else a list of oneDNN packs, one per matrix.
Packs = torch.Tensor | list[torch.Tensor]
_packs: dict[int, tuple[weakref.ref, int, int, Packs]] = {}


def packing_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether products of `dtype` weights on `device` can use packed weights (CPU, bf16, a oneDNN
    build whose CPU has bf16 support)."""
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return supported is not None and bool(supported())


def pack_for_decode(model: nn.Module, skip: set[int] = frozenset()) -> int:
    """Pack the bf16 CPU weights of `model`'s linear layers and routed experts (but those whose id is
    in `skip`: packed already); returns how many weight matrices were packed (0 where packing is not
    available: nothing changes)."""
    packed = 0
    for module, weight in _decode_weights(model):
        if type(module) is nn.Linear:
            module.__class__ = PackedLinear  # the same module (parameters, state dict) with a packed product
        if id(weight) not in skip:
            _pack(weight)
        packed += weight.shape[0] if weight.dim() == 3 else 1
    return packed


def _decode_weights(model: nn.Module) -> Iterator[tuple[nn.Module, torch.Tensor]]:
    """(module, weight) of each bf16 CPU weight of `model` that decoding can read packed: the linear
    layers' (but a biased one's where the few-row kernel would take it: the kernel rounds to bf16
    before the bias could be added) and the routed experts' two stacks."""
    for module in model.modules():
        if type(module) in (nn.Linear, PackedLinear) and packing_available(module.weight.device, module.weight.dtype):
            if module.bias is None or not _kernel_layout(module.weight):
                yield module, module.weight
        elif _is_experts(module) and packing_available(module.gate_up_proj.device, module.gate_up_proj.dtype):
            yield module, module.gate_up_proj
            yield module, module.down_proj


def _kernel_layout(weight: torch.Tensor) -> bool:
    """Whether `weight` is packed in `bf16_rows`' layout (else in oneDNN's)."""
    return bf16_rows.available() and bf16_rows.packable(weight)


def _recorded_packs(weight: torch.Tensor) -> Packs | None:
    """The packs recorded for `weight`, fresh or not (their memory can be written over)."""
    entry = _packs.get(id(weight))
    return entry[3] if entry is not None and entry[0]() is weight else None


def refresh_and_pack(model: nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Copy the state dict `source` (of the same architecture, in another dtype: GRPO's float32 policy)
    into `model` (its bf16 rollout copy) and pack it for decoding (`pack_for_decode`). A weight
    already packed in `bf16_rows`' layout from a float32 source is copied and packed in one pass
    (`bf16_rows.pack_float`: the same bytes as `copy_` then `pack`, 1.7x faster for the benchmark's
    experts); everything else is copied, then packed as `pack_for_decode` packs it."""
    fused = set()
    with torch.no_grad():
        for name, value in model.state_dict(keep_vars=True).items():
            src = source[name]
            packs = _recorded_packs(value)
            if (isinstance(packs, torch.Tensor) and src.dtype == torch.float32 and src.device == value.device
                    and src.shape == value.shape and src.is_contiguous() and value.is_contiguous()
                    and value.dtype == torch.bfloat16):
                bf16_rows.pack_float(src, value, packs)
                _record(value, packs)
                fused.add(id(value))
            else:
                value.copy_(src)
    pack_for_decode(model, skip=fused)


def pack_for_generation(model: nn.Module, check_memory: bool = True) -> bool:
    """Pack `model` for decoding (`pack_for_decode`) unless it has nothing to pack, its packs are all
    fresh already, or (`check_memory`) they would take more than a quarter of the memory available now:
    a model that barely fits is left alone. Returns whether its products now read packs."""
    weights = [weight for _, weight in _decode_weights(model)]
    if not weights:
        return False
    with torch.no_grad():  # (decoding runs without autograd)
        if all(fresh_packs(w) is not None for w in weights):
            return True
    if check_memory:
        available = _available_memory()
        if available is None or sum(w.numel() * w.element_size() for w in weights) > available // 4:
            return False
    pack_for_decode(model)
    return True


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def release_packs(model: nn.Module) -> None:
    """Drop the packed copies of `model`'s weights, and the attention layers' copies of their absorbed
    matrices. Also what to call after changing weights behind autograd's back (`.data` writes, an
    optimizer that does not bump version counters, such as torch's fused AdamW: `build_optimizer`
    marks its steps itself), which the packs cannot see."""
    for param in model.parameters():
        _packs.pop(id(param), None)
    for module in model.modules():
        if type(module) is PackedLinear:
            module.__class__ = nn.Linear
        if hasattr(module, "drop_weight_copies"):
            module.drop_weight_copies()


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose bf16 product reads the weight packed by `pack_for_decode` while that
    copy is fresh (else, or with bf16 inputs that need a gradient, the plain product). A biased layer
    is not packed where the few-row kernel would take it (`_decode_weights`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packs = fresh_packs(self.weight)
        kernel = isinstance(packs, torch.Tensor)
        if (packs is None or x.dtype != torch.bfloat16 or (torch.is_grad_enabled() and x.requires_grad)
                or kernel and x.numel() > bf16_rows.MAX_ROWS * x.shape[-1]):
            return super().forward(x)  # (a prefill's many rows: oneDNN's product of the plain weight)
        return packed_linear(x, packs if kernel else packs[0], self.bias)


def fresh_packs(weight: torch.Tensor) -> Packs | None:
    """The packed copy of `weight` (a tensor in `bf16_rows`' layout, or a list of oneDNN packs, one per
    matrix: a stacked [E, ...] weight has E), or None when it has none, they are stale, or autograd
    would need the product's gradient."""
    entry = _packs.get(id(weight))
    if entry is None or (torch.is_grad_enabled() and weight.requires_grad):
        return None
    ref, version, pointer, packs = entry
    if ref() is not weight or version != weight._version or pointer != weight.data_ptr():
        return None
    return packs


def packed_linear(x: torch.Tensor, pack: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) for x [..., in] in bf16 with W packed by `pack_for_decode` (one oneDNN pack, or
    `bf16_rows`' layout)."""
    if pack.layout == torch.strided:
        if bias is not None:
            raise ValueError("packed_linear: the few-row kernel's packs take no bias (it would round twice)")
        return bf16_rows.rows(x, pack)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), pack, bias, "none", [None], "")


def _is_experts(module: nn.Module) -> bool:
    """Stacked routed experts (`moe.Experts`: gate_up_proj [E, 2I, H], down_proj [E, H, I]), recognised by
    their weights: `moe` imports this module's kernels."""
    weights = (getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None))
    return all(isinstance(w, nn.Parameter) and w.dim() == 3 for w in weights)


def _pack(weight: torch.Tensor) -> None:
    """Pack `weight` ([N, K], or [E, N, K] stacked experts): in `bf16_rows`' layout where its kernel
    runs, over the previous packs' memory when they have the shape (a refresh between GRPO rollouts
    then allocates nothing), else one oneDNN pack per matrix."""
    if _kernel_layout(weight):
        previous = _recorded_packs(weight)
        reuse = isinstance(previous, torch.Tensor) and previous.shape == bf16_rows.packed_shape(weight)
        packs: Packs = bf16_rows.pack(weight, out=previous if reuse else None)
    else:
        matrices = [weight.detach()] if weight.dim() == 2 else list(weight.detach().unbind(0))
        packs = [torch.ops.mkldnn._reorder_linear_weight(m.contiguous(), ROW_HINT) for m in matrices]
    _record(weight, packs)


def _record(weight: torch.Tensor, packs: Packs) -> None:
    """Remember `packs` as the packed copy of `weight` as it is now."""
    key = id(weight)
    if key not in _packs:
        weakref.finalize(weight, _packs.pop, key, None)
    _packs[key] = (weakref.ref(weight), weight._version, weight.data_ptr(), packs)
