"""DeepSeek-V3's FP8 mixed-precision training recipe (report §3.3), applied to a built model.

``convert_to_fp8_training(model)`` swaps the linear layers the hub stores in FP8 (attention
projections, dense, shared and routed expert MLPs: :func:`~seekformer.quant.fp8.default_fp8_selector`)
for layers whose three GEMMs run in FP8 e4m3 with fine-grained scaling:

* fprop ``Y = X Wᵀ``: X in 1x128 tiles along K, W in 128x128 blocks;
* dgrad ``dX = dY W``: dY in 1x128 tiles along N, W in the same 128x128 blocks (transposed);
* wgrad ``dW = dYᵀ X``: both in 1x128 tiles along the token dimension (the "128x1" tiles of the
  report: X is read back from its FP8 copy, dequantised, transposed and requantised);

each GEMM promoting its partial sums to float32 every 128 elements of K (``fp8_gemm``). The input of
each swapped linear is saved for the backward in FP8 (1 byte per element plus one float32 scale per
128) instead of bf16, once per input tensor (linears reading the same tensor share the copy); the
SwiGLU MLPs save gate and up only and recompute down_proj's input in the backward, and the routed
experts' weighted sum keeps only the expert outputs (docs/fp8.md, "What is saved for the backward";
none of this changes a value). On CUDA each quantisation is one fused Triton kernel (``fp8_triton``:
the same bytes and scales as ``quantize_blockwise``, the transposed operands read in place); elsewhere
the torch code runs. Everything else stays as it was: embedding, output head, MoE router, norms and
the attention core run in the trainer's bf16 autocast, master weights and their gradients are float32
(the swapped layers keep the same ``nn.Parameter`` objects, so optimizers and checkpoints see no
difference).
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import MLP
from ..model.moe import Experts, RouterOutput
from .fp8 import default_fp8_selector, dequantize_blockwise, quantize_blockwise
from .fp8_gemm import TILE, fp8_gemm

ACT = (1, TILE)  # activations and gradients: 1x128 tiles
WEIGHT = (TILE, TILE)  # weights: 128x128 blocks


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer's output has here: the autocast dtype under autocast, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@functools.cache
def _fused_kernels():
    """The fused Triton quantisation (``quant/fp8_triton.py``) where triton imports (torch's CUDA
    wheels ship it), else None."""
    try:
        from . import fp8_triton
    except ImportError:
        return None
    return fp8_triton


def _fused(t: torch.Tensor):
    """``fp8_triton`` for a CUDA tensor its kernels take, else None (the torch code runs)."""
    kernels = _fused_kernels() if t.is_cuda else None
    return kernels if kernels is not None and kernels.supports(t) else None


def _quantize(t: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Training quantisation: no finiteness check (it would wait for the device at every GEMM); a
    non-finite value reaches the loss as it would in bf16 training. On CUDA one fused Triton pass
    (the same values, see ``fp8_triton``); a transposed view is read in place there."""
    if (fused := _fused(t)) is not None:
        return fused.quantize_tiles(t, block)
    return quantize_blockwise(t, block, check_finite=False)


def _quantize_weight_transposed(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Wᵀ in 128x128 blocks (dgrad's B operand): the blocks of W transposed, so the same values as
    ``_quantize(weight.t(), WEIGHT)``; the fused kernel reads W in place and writes Wᵀ's bytes."""
    if (fused := _fused(weight)) is not None:
        return fused.quantize_tiles(weight.t(), WEIGHT)
    w_q, w_s = _quantize(weight, WEIGHT)
    return w_q.t().contiguous(), w_s.t()


def _requantize_transposed(x_q: torch.Tensor, x_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Xᵀ in 1x128 tiles along the tokens (wgrad's B operand) from X's 1x128-tiled FP8 copy: dequantised,
    transposed and requantised (one fused pass on CUDA)."""
    if (fused := _fused(x_q)) is not None:
        return fused.requantize_transposed(x_q, x_s)
    return _quantize(dequantize_blockwise(x_q, x_s, ACT).t(), ACT)


class _InputFP8Cache(threading.local):
    """The FP8 copy of the last linear input, for the next linear that reads the very same tensor
    (one per thread).

    q_a_proj and kv_a_proj_with_mqa read one normed hidden state, as do gate_proj and up_proj: both
    save the same FP8 storage for the backward instead of one copy each (the quantisation is the same,
    so nothing changes numerically). Everything is held by weak references: the copy lives only while
    a backward graph keeps it, and a tensor modified in place (its version changes) is quantised anew.
    """

    def __init__(self) -> None:
        self._entry: tuple[weakref.ref, int, weakref.ref, weakref.ref] | None = None

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.is_inference():  # no version counter; nothing is saved for a backward anyway
            return _quantize(x.reshape(-1, x.shape[-1]), ACT)
        if self._entry is not None:
            source, version, x_q, x_s = (e if isinstance(e, int) else e() for e in self._entry)
            if source is x and version == x._version and x_q is not None and x_s is not None:
                return x_q, x_s
        with torch.no_grad():
            x_q, x_s = _quantize(x.detach().reshape(-1, x.shape[-1]), ACT)
        self._entry = (weakref.ref(x), x._version, weakref.ref(x_q), weakref.ref(x_s))
        return x_q, x_s


_input_cache = _InputFP8Cache()


def _fprop(x_q: torch.Tensor, x_s: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           out_dtype: torch.dtype) -> torch.Tensor:
    """``Y = X Wᵀ (+ b)`` as ``out_dtype`` from X's FP8 copy; W quantised in 128x128 blocks (the bias is
    added to the float32 product before rounding)."""
    w_q, w_s = _quantize(weight, WEIGHT)
    if bias is None:
        return fp8_gemm(x_q, x_s, w_q, w_s, 1, TILE, out_dtype)
    return (fp8_gemm(x_q, x_s, w_q, w_s, 1, TILE) + bias.float()).to(out_dtype)


def _linear_backward(g: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor, weight: torch.Tensor, x_dtype: torch.dtype,
                     need_x: bool, need_w: bool, need_b: bool) -> tuple[torch.Tensor | None, ...]:
    """(dX [M, K] as ``x_dtype``, dW in the weight's dtype, db float32) for dY ``g`` [M, N], each when needed."""
    grad_x = grad_w = grad_b = None
    if need_x:  # dgrad: dY [M, N] (1x128 tiles along N) times W [N, K] = Wᵀᵀ: 128x128 blocks of Wᵀ
        wt_q, wt_s = _quantize_weight_transposed(weight)
        g_q, g_s = _quantize(g, ACT)
        grad_x = fp8_gemm(g_q, g_s, wt_q, wt_s, 1, TILE, x_dtype)
    if need_w:  # wgrad: dYᵀ [N, M] times X [M, K], both tiled 1x128 along the tokens M
        gt_q, gt_s = _quantize(g.t(), ACT)
        xt_q, xt_s = _requantize_transposed(x_q, x_s)  # from the FP8 copy of the forward
        grad_w = fp8_gemm(gt_q, gt_s, xt_q, xt_s, 1, 1, weight.dtype)
    if need_b:
        grad_b = g.float().sum(0)
    return grad_x, grad_w, grad_b


class _FP8Linear(torch.autograd.Function):
    """``y = x Wᵀ + b`` with fprop, dgrad and wgrad as FP8 GEMMs; only x's FP8 copy (x_q, x_s, made by
    the caller) is saved for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, x_q: torch.Tensor, x_s: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype):
        shape = x.shape
        with torch.autocast(x.device.type, enabled=False):
            y = _fprop(x_q, x_s, weight, bias, out_dtype)
        ctx.save_for_backward(x_q, x_s, weight)
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = shape, x.dtype, bias is not None
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x_q, x_s, weight = ctx.saved_tensors
        need_x, _, _, need_w, need_b = ctx.needs_input_grad[:5]
        with torch.autocast(grad_y.device.type, enabled=False):
            grad_x, grad_w, grad_b = _linear_backward(grad_y.reshape(-1, grad_y.shape[-1]), x_q, x_s, weight,
                                                      ctx.x_dtype, need_x, need_w, need_b and ctx.has_bias)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, None, grad_w, grad_b, None


def fp8_linear_train(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with V3's FP8 training numerics (see the module docstring); output in the compute
    dtype (bf16 under bf16 autocast), gradients of ``weight`` and ``bias`` in their own dtypes."""
    with torch.autocast(x.device.type, enabled=False):
        x_q, x_s = _input_cache.quantize(x)
    return _FP8Linear.apply(x, x_q, x_s, weight, bias, _compute_dtype(x))


def _swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, need_gate: bool, need_up: bool):
    """The gradients autograd gives ``F.silu(gate) * up`` (silu recomputed)."""
    grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if need_gate else None
    grad_up = grad * F.silu(gate) if need_up else None
    return grad_gate, grad_up


class _FP8SwiGLULinear(torch.autograd.Function):
    """``down(silu(gate) * up)`` with the FP8 GEMMs of ``_FP8Linear``, saving only gate and up: the
    SwiGLU output (down's input) is recomputed and requantised in the backward, as the V3 report does
    for the MoE's SwiGLU. The recomputation is deterministic, so the values and gradients are those of
    ``fp8_linear_train(F.silu(gate) * up, weight)`` bit for bit, without its saved FP8 input."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                out_dtype: torch.dtype):
        hidden = F.silu(gate) * up
        shape = hidden.shape
        with torch.autocast(gate.device.type, enabled=False):
            y = _fprop(*_quantize(hidden.reshape(-1, shape[-1]), ACT), weight, bias, out_dtype)
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        gate, up, weight = ctx.saved_tensors
        need_gate, need_up, need_w, need_b = ctx.needs_input_grad[:4]
        hidden = F.silu(gate) * up
        with torch.autocast(grad_y.device.type, enabled=False):
            x_q, x_s = _quantize(hidden.reshape(-1, hidden.shape[-1]), ACT)
            grad_h, grad_w, grad_b = _linear_backward(grad_y.reshape(-1, grad_y.shape[-1]), x_q, x_s, weight,
                                                      hidden.dtype, need_gate or need_up, need_w,
                                                      need_b and ctx.has_bias)
        grad_gate = grad_up = None
        if grad_h is not None:
            grad_h = grad_h.view(hidden.shape)
            grad_gate, grad_up = _swiglu_backward(grad_h, gate, up, need_gate, need_up)
        return grad_gate, grad_up, grad_w, grad_b, None


def fp8_swiglu_linear_train(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """``fp8_linear_train(F.silu(gate) * up, weight, bias)`` saving gate and up only (see ``_FP8SwiGLULinear``)."""
    return _FP8SwiGLULinear.apply(gate, up, weight, bias, _compute_dtype(gate))


class _WeightedSlotSum(torch.autograd.Function):
    """``zeros(N, H).index_add_(0, token_of_slot, (ys * weights[:, None]).to(dtype))``: each routed slot's
    expert output times its gate weight, summed into its token. Autograd's ``index_add`` saves its whole
    source, a float32 [S, H] tensor here, only to read its shape, and the product saves ys as well; this
    saves ys alone and computes the gradients as autograd does."""

    @staticmethod
    def forward(ctx, ys: torch.Tensor, weights: torch.Tensor, token_of_slot: torch.Tensor, n_tokens: int,
                dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(ys, weights, token_of_slot)
        scaled = (ys * weights.unsqueeze(-1)).to(dtype)
        return scaled.new_zeros(n_tokens, ys.shape[1]).index_add_(0, token_of_slot, scaled)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        ys, weights, token_of_slot = ctx.saved_tensors
        grad = grad_out.index_select(0, token_of_slot).to(torch.promote_types(ys.dtype, weights.dtype))
        grad_ys = (grad * weights.unsqueeze(-1)).to(ys.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (grad * ys).sum(-1).to(weights.dtype) if ctx.needs_input_grad[1] else None
        return grad_ys, grad_w, None, None, None


class FP8TrainingLinear(nn.Linear):
    """An ``nn.Linear`` whose forward and backward GEMMs run in FP8 (same parameters, same state dict)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8TrainingLinear:
        """A layer sharing ``linear``'s parameter objects (so an optimizer built before or after sees them)."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear_train(x, self.weight, self.bias)


class FP8TrainingMLP(MLP):
    """A SwiGLU MLP of FP8 linears (the same parameters): gate_proj and up_proj share one FP8 copy of
    the input, and down_proj's input is recomputed from gate and up in the backward
    (:func:`fp8_swiglu_linear_train`)."""

    @classmethod
    def from_mlp(cls, mlp: MLP) -> FP8TrainingMLP:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.gate_proj, new.up_proj, new.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        new.train(mlp.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_swiglu_linear_train(self.gate_proj(x), self.up_proj(x), self.down_proj.weight, self.down_proj.bias)


class FP8TrainingExperts(Experts):
    """Routed experts whose per-expert GEMMs run in FP8 (same stacked parameters ``gate_up_proj`` and
    ``down_proj``): the routing, sorting and weighting of ``Experts`` with each expert's two products
    replaced by :func:`fp8_linear_train` and :func:`fp8_swiglu_linear_train`, and the weighted sum into
    the tokens by ``_WeightedSlotSum``. Saved for the backward per routed slot: the FP8 copy of the
    expert's input, the bf16 gate/up product and the bf16 expert output (for the gate weight's gradient)."""

    @classmethod
    def from_experts(cls, experts: Experts) -> FP8TrainingExperts:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.n_experts, new.intermediate = experts.n_experts, experts.intermediate
        new.init_std = experts.init_std
        new.gate_up_proj, new.down_proj = experts.gate_up_proj, experts.down_proj
        new.implementation = "autograd_loop"
        new._grad_storage = {}
        new.train(experts.training)
        return new

    def resolve_implementation(self, device: torch.device, dtype: torch.dtype) -> str:
        return "autograd_loop"

    def forward(self, x: torch.Tensor, route: RouterOutput) -> torch.Tensor:
        """x [N, H] -> [N, H], as ``Experts.forward`` (slots sorted by expert, weighted, summed per token)."""
        order = route.indices.flatten().argsort(stable=True)
        token_of_slot = order // route.indices.shape[1]
        slot_weights = route.weights.flatten().index_select(0, order)
        ys = self._autograd_loop(x.index_select(0, token_of_slot), route.counts)
        return _WeightedSlotSum.apply(ys, slot_weights, token_of_slot, x.shape[0], x.dtype)

    def _autograd_loop(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        outs = []
        for expert, chunk in enumerate(xs.split(counts.tolist())):
            if chunk.shape[0]:
                gate, up = fp8_linear_train(chunk, gate_up[expert]).chunk(2, dim=-1)
                outs.append(fp8_swiglu_linear_train(gate, up, down[expert]))
        return torch.cat(outs) if outs else xs.new_zeros(xs.shape)


def convert_to_fp8_training(model: nn.Module) -> list[str]:
    """Swap, in place, the linear layers the hub stores in FP8, every SwiGLU ``MLP`` (dense and shared
    experts) and every routed ``Experts`` module for their FP8-training versions; returns the swapped
    module names. Call it on the built model before the optimizer is built or after (the parameters
    are the same objects)."""
    swapped = []
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if isinstance(module, nn.Linear) and not isinstance(module, FP8TrainingLinear):
            if not default_fp8_selector(f"{name}.weight"):
                continue
            new: nn.Module = FP8TrainingLinear.from_linear(module)
        elif type(module) is Experts:
            new = FP8TrainingExperts.from_experts(module)
        elif type(module) is MLP:
            new = FP8TrainingMLP.from_mlp(module)
        else:
            continue
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        swapped.append(name)
    return swapped


def _is_weight(t: torch.Tensor, parameter_storages: set[int]) -> bool:
    """A parameter, a view of one (an expert's row of a stacked weight), or autocast's cast of one."""
    if isinstance(t, nn.Parameter) or t.untyped_storage().data_ptr() in parameter_storages:
        return True
    fn = (t if t._base is None else t._base).grad_fn  # a linear saves its weight as a transposed view
    return type(fn).__name__ == "ToCopyBackward0" and any(
        isinstance(getattr(f, "variable", None), nn.Parameter) for f, _ in fn.next_functions)


class SavedTensorMeter:
    """What autograd keeps for the backward: the storages of the tensors saved while the meter is
    active (``with meter: forward; backward``), weights excluded, counted once per storage among those
    still held when the backward starts (or when the block ends without one), so that neither a
    storage saved twice nor a tensor saved by a graph branch that died before the backward counts
    twice or at all. ``tag`` (settable during the forward, e.g. from module hooks) labels each storage
    with the first tag it was saved under. Excluded as weights: ``nn.Parameter`` objects, tensors
    sharing a storage with one of ``parameters`` (the per-expert views of stacked expert weights) and
    autocast's low-precision casts of parameters (a per-step copy of the weights, not per token)."""

    def __init__(self, parameters=()) -> None:
        self._parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self._saved: list[tuple[weakref.ref, str]] = []
        self.storages: dict[int, tuple[str, int, torch.dtype]] | None = None  # pointer -> (tag, bytes, dtype)
        self.tag = ""
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not _is_weight(t, self._parameter_storages):
            self._saved.append((weakref.ref(t), self.tag))
        return t

    def _unpack(self, t: torch.Tensor) -> torch.Tensor:
        if self.storages is None:
            self._snapshot()
        return t

    def _snapshot(self) -> None:
        self.storages = {}
        for ref, tag in self._saved:
            t = ref()
            if t is not None:
                s = t.untyped_storage()
                self.storages.setdefault(s.data_ptr(), (tag, s.nbytes(), t.dtype))
        self._saved = []

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        if self.storages is None:
            self._snapshot()

    def total(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of the distinct storages (of one dtype only, with ``dtype``)."""
        return sum(n for _, n, d in self.storages.values() if dtype is None or d == dtype)


def saved_activation_bytes(step, parameters=()) -> tuple[int, int]:
    """What autograd saves for the backward while ``step()`` runs its forward and backward, weights
    excluded (the activation memory of a training step, see :class:`SavedTensorMeter`): ``(bytes of
    the distinct storages, bytes of those in float8)`` — the second is the number of linear-input
    elements this recipe keeps in FP8."""
    with SavedTensorMeter(parameters) as meter:
        step()
    return meter.total(), meter.total(torch.float8_e4m3fn)
