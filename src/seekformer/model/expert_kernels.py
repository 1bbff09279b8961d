"""How the routed experts run: the kernels behind `moe.Experts`, apart from what they compute.

Shapes: N tokens, H hidden size, E experts, I expert intermediate size, S = N*K slots (token-expert
pairs, K experts per token) sorted by expert, R rows of the CPU loop's buffers (S plus padding).

- `select_implementation` picks the path from the device and the dtype the products run in (the
  autocast dtype under autocast, where the residual stream stays float32): one grouped GEMM per
  projection on CUDA in bf16, the per-expert loop elsewhere.
- `grouped_experts`: `F.grouped_mm` over the rows sorted by expert. Its offsets are computed on the
  device, so nothing waits for the host. Not yet run on a GPU (see docs/model.md).
- `looped_experts`: one matrix product per expert with a hand-written backward (`LoopedExperts`),
  the CPU path. It needs the per-expert counts on the host (its Python loop is over experts), which
  on CPU costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import bf16_rows
from .packed_weights import fresh_packs, packed_linear


def select_implementation(device: torch.device, dtype: torch.dtype) -> str:
    """"grouped_mm" on CUDA when the products run in bf16 (`dtype`: see `layers.compute_dtype`),
    else "loop": on CPU the loop measured as fast as the grouped GEMM in bf16 and 1.5x faster in fp32
    (benchmarks/experts.py)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and hasattr(F, "grouped_mm"):
        return "grouped_mm"
    return "loop"


def grouped_experts(xs: torch.Tensor, counts: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """down(silu(gate) * up) of each expert over its rows of xs [S, H] (sorted by expert, counts [E]),
    as two grouped GEMMs in `dtype`. Returns [S, H] in `dtype`."""
    offsets = counts.cumsum(0).to(torch.int32)  # [E] end row of each expert, on the device
    xs = xs.to(dtype)
    gate_up = F.grouped_mm(xs, gate_up_proj.to(dtype).transpose(1, 2), offs=offsets)  # [S, 2I]
    gate, up = gate_up.chunk(2, dim=-1)
    return F.grouped_mm(F.silu(gate) * up, down_proj.to(dtype).transpose(1, 2), offs=offsets)


def looped_experts(x: torch.Tensor, slot_weights: torch.Tensor, token_of_slot: torch.Tensor, counts: torch.Tensor,
                   gate_up_proj: torch.Tensor, down_proj: torch.Tensor, dtype: torch.dtype,
                   storage: dict[str, torch.UntypedStorage]) -> torch.Tensor:
    """[N, H]: each token's slots (token_of_slot [S], weights slot_weights [S], sorted by expert with
    counts [E]) through their experts, weighted and summed; see `LoopedExperts` (`storage`: the
    module's memory kept between steps), or
    `few_row_experts` for inference over a few rows per expert (a decode step)."""
    counts_list = counts.tolist()
    if (token_of_slot.shape[0] <= FEW_ROWS * len(counts_list)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, slot_weights, gate_up_proj,
                                                                               down_proj)))):
        return few_row_experts(x, slot_weights, token_of_slot, counts_list, gate_up_proj, down_proj, dtype)
    return LoopedExperts.apply(x, slot_weights, gate_up_proj, down_proj, token_of_slot, counts_list, dtype,
                               storage)


FEW_ROWS = 16  # slots per expert, on average, up to which inference takes `few_row_experts`


def few_row_experts(x: torch.Tensor, slot_weights: torch.Tensor, token_of_slot: torch.Tensor, counts: list[int],
                    gate_up_proj: torch.Tensor, down_proj: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`LoopedExperts`' forward for inference when experts get a few rows each (decode: 32 rows top-6
    over 64 experts is 3 rows per expert), where the cost is reading each expert's weights and the
    calls, not the arithmetic.

    The rows are not padded (a handful of row counts, so oneDNN builds few kernels), and nothing is
    done per expert but its two products: the activation, the gate weights and the sum into the
    tokens run once over all slots. The products read weights packed by `pack_for_decode` when they
    are fresh: all experts in one call of the few-row kernel (`bf16_rows.py`, 2.7x faster than
    oneDNN's packs for a 32-row decode step here), or oneDNN's packs one expert at a time
    (`packed_weights.py`: 3-4x faster than unpacked in bf16 here). Otherwise, when nearly every expert
    has rows and the weights are already in the compute dtype, the experts run as two batched
    products over rows padded to the busiest expert's count: one call each instead of two per expert
    (measured 1.2x faster than the loop: 2-core CPU, 32 rows, 64 experts, bf16). Same output as
    `LoopedExperts` (the slots' sum in float32, rounded once).
    """
    with torch.autocast(x.device.type, enabled=False):
        xs = x.to(dtype).index_select(0, token_of_slot)  # [S, H] in expert order
        gate_up_packs, down_packs = fresh_packs(gate_up_proj), fresh_packs(down_proj)
        if isinstance(gate_up_packs, torch.Tensor) and isinstance(down_packs, torch.Tensor) \
                and dtype == gate_up_proj.dtype:  # every expert in one call of `bf16_rows`' kernel
            counts_t = torch.tensor(counts, dtype=torch.int64)
            gate, up = bf16_rows.grouped_rows(xs, counts_t, gate_up_packs).chunk(2, dim=-1)
            ys = bf16_rows.grouped_rows(F.silu(gate) * up, counts_t, down_packs)
        elif gate_up_packs is not None and down_packs is not None and dtype == gate_up_proj.dtype:
            ys = _expert_products(xs, counts, lambda e, rows: packed_linear(rows, gate_up_packs[e]),
                                  lambda e, rows: packed_linear(rows, down_packs[e]))
        elif (gate_up_proj.dtype == dtype and down_proj.dtype == dtype and 8 * counts.count(0) <= len(counts)
              and max(counts) * len(counts) <= 4 * len(token_of_slot)):
            ys = _batched_expert_products(xs, counts, gate_up_proj, down_proj)
        else:
            ys = _expert_products(xs, counts, lambda e, rows: torch.mm(rows, gate_up_proj[e].to(dtype).t()),
                                  lambda e, rows: torch.mm(rows, down_proj[e].to(dtype).t()))
        out = torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        out.index_add_(0, token_of_slot, ys * slot_weights.unsqueeze(-1))
        return out.to(x.dtype)


def _expert_products(xs: torch.Tensor, counts: list[int], gate_up: Callable, down: Callable) -> torch.Tensor:
    """down(silu(gate) * up) of each expert over its rows of xs [S, H] (sorted by expert), with
    `gate_up(e, rows)` and `down(e, rows)` the products of expert e."""
    spans = expert_spans(counts, 1)[0]
    if not spans:
        return torch.zeros_like(xs)
    gate, up = torch.cat([gate_up(span.expert, xs[span.rows]) for span in spans]).chunk(2, dim=-1)
    hidden = F.silu(gate) * up
    return torch.cat([down(span.expert, hidden[span.rows]) for span in spans])


def _batched_expert_products(xs: torch.Tensor, counts: list[int], gate_up_proj: torch.Tensor,
                             down_proj: torch.Tensor) -> torch.Tensor:
    """down(silu(gate) * up) of every expert over its rows of xs [S, H] (sorted by expert, counts per
    expert) as two batched products over an [E, busiest expert's rows, H] buffer (zero padding)."""
    counts_t = torch.tensor(counts, device=xs.device)
    expert = torch.repeat_interleave(torch.arange(len(counts), device=xs.device), counts_t)  # [S]
    row = torch.arange(xs.shape[0], device=xs.device) - (counts_t.cumsum(0) - counts_t)[expert]
    rows = xs.new_zeros(len(counts), max(counts), xs.shape[1])
    rows[expert, row] = xs
    gate, up = torch.bmm(rows, gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
    return torch.bmm(F.silu(gate) * up, down_proj.transpose(1, 2))[expert, row]


class LoopedExperts(torch.autograd.Function):
    """Routed experts as one matrix product per expert, with a hand-written backward.

    Inputs: x [N, H], slot_weights [S] (the S = N*K gate weights in expert order), the stacked weights
    gate_up_proj [E, 2I, H] and down_proj [E, H, I], token_of_slot [S], counts (list of E ints), the
    compute dtype (the autocast dtype under autocast) and `storage`, the module's dict of kept memory.
    Output [N, H] in x's dtype, computed as the autograd loop does: per expert `down(silu(gate) * up)`
    in the compute dtype, times the slot's weight, summed over each token's slots in expert order (in
    float32 at least: with bf16 x the loop rounds each slot to bf16 before the sum, this rounds once,
    after it).

    Against the same loop left to autograd (`Experts.implementation = "autograd_loop"`, `moe.py`):
    - per expert only its products and the SwiGLU on its rows (in cache); the slots are scaled and
      summed into their tokens (`index_add_`, in slot order: the same sums) in chunks of `CHUNK_ROWS`
      rows, and the incoming gradient is gathered per token and scaled the same way;
    - backward writes each expert's weight gradient straight into its row of the [E, ...] gradient
      instead of stacking E separate gradients (`UnbindBackward`), and recomputes the activation from
      the saved gate/up products;
    - the weights are cast to the compute dtype once per forward, each expert's just before its
      products (the copy is still in cache when the product reads it), and that copy, the saved row
      buffers and the gradients live in memory kept between steps (`_kept_buffer`):
      fresh buffers of tens of MB cost more in page faults (~0.3-0.8 ms/MB on this CPU) than the
      products written into them. Memory is reused only when nothing else holds it (a forward whose
      backward has not run yet keeps its buffers), so the kept memory is at most what one forward
      and backward hold at their peak.
    """

    @staticmethod
    def forward(ctx, x, slot_weights, gate_up_proj, down_proj, token_of_slot, counts, dtype, storage):
        spans, n_rows = expert_spans(counts, row_alignment(x.device, dtype))
        n_tokens, hidden_size = x.shape
        inter = down_proj.shape[2]
        sizes = [span.padded for span in spans]
        with torch.autocast(x.device.type, enabled=False):
            token_of_row, row_of_slot = _row_maps(token_of_slot, spans, n_rows, n_tokens)
            # the weights in the compute dtype, each expert's cast just before its products (in cache)
            w_gate_up = _cast_buffer(gate_up_proj, dtype, storage, "cast.gate_up_proj")
            w_down = _cast_buffer(down_proj, dtype, storage, "cast.down_proj")
            xs = _kept_buffer(storage, "xs", (n_rows, hidden_size), dtype, x.device)  # padding rows zero
            torch.index_select(_with_zero_row(x.to(dtype)), 0, token_of_row, out=xs)
            gate_up = _kept_buffer(storage, "gate_up", (n_rows, 2 * inter), dtype, x.device)
            outs = _kept_buffer(storage, "outs", (n_rows, hidden_size), dtype, x.device)
            hidden = _scratch(spans, inter, xs)
            for span, x_e, gate_up_e, out_e in zip(spans, xs.split(sizes), gate_up.split(sizes), outs.split(sizes)):
                if w_gate_up is not gate_up_proj:
                    w_gate_up[span.expert].copy_(gate_up_proj[span.expert].detach())
                    w_down[span.expert].copy_(down_proj[span.expert].detach())
                torch.mm(x_e, w_gate_up[span.expert].t(), out=gate_up_e)
                h = torch.mul(F.silu(gate_up_e[:, :inter]), gate_up_e[:, inter:], out=hidden[: span.padded])
                torch.mm(h, w_down[span.expert].t(), out=out_e)
            # each row's gate weight (0 on padding rows, which add their zeros to a dummy token)
            weight_of_row = slot_weights.new_zeros(n_rows).index_copy_(0, row_of_slot, slot_weights)
            out = x.new_zeros(n_tokens + 1, hidden_size, dtype=torch.promote_types(x.dtype, torch.float32))
            _sum_rows_into(out, token_of_row, outs, weight_of_row)
            out = out[:n_tokens].to(x.dtype)
        ctx.save_for_backward(xs, gate_up, outs, weight_of_row, token_of_row, row_of_slot, slot_weights,
                              gate_up_proj, down_proj, w_gate_up, w_down)
        ctx.spans, ctx.x_dtype, ctx.storage = spans, x.dtype, storage
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (xs, gate_up, outs, weight_of_row, token_of_row, row_of_slot, slot_weights, gate_up_proj, down_proj,
         w_gate_up, w_down) = ctx.saved_tensors
        need_x, need_weights, need_gate_up, need_down = ctx.needs_input_grad[:4]
        dtype, spans, storage = xs.dtype, ctx.spans, ctx.storage
        n_rows, hidden_size = xs.shape
        inter = gate_up.shape[1] // 2
        sizes = [span.padded for span in spans]
        grad_x = grad_weights = grad_gate_up = grad_down = None
        with torch.autocast(grad_out.device.type, enabled=False):
            # each row's output gradient: its token's, times its gate weight, rounded once to the
            # compute dtype (the forward's `outs * weights` ran in their promoted dtype)
            grad_rows = _kept_buffer(storage, "grad_rows", (n_rows, hidden_size), dtype, xs.device)
            grad_of_row = slot_weights.new_empty(n_rows) if need_weights else None
            grad_out = _with_zero_row(grad_out.to(torch.promote_types(dtype, slot_weights.dtype)))
            gathered = grad_out.new_empty(min(CHUNK_ROWS, n_rows), hidden_size)
            for start in range(0, n_rows, CHUNK_ROWS):
                rows = slice(start, start + CHUNK_ROWS)
                grad_y = torch.index_select(grad_out, 0, token_of_row[rows], out=gathered[: min(CHUNK_ROWS,
                                                                                               n_rows - start)])
                if need_weights:
                    torch.sum(grad_y * outs[rows], dim=-1, out=grad_of_row[rows])
                torch.mul(grad_y, weight_of_row[rows].unsqueeze(1), out=grad_rows[rows])
            if need_weights:
                grad_weights = grad_of_row.index_select(0, row_of_slot)
            grad_down = _ExpertGrad(down_proj, spans, dtype, storage, "down_proj") if need_down else None
            grad_gate_up = _ExpertGrad(gate_up_proj, spans, dtype, storage, "gate_up_proj") if need_gate_up else None
            grad_hidden, hidden, scratch = (_scratch(spans, inter, xs) for _ in range(3))
            grad_products = _scratch(spans, 2 * inter, xs)  # d gate, d up
            for i, (span, grad_e, gate_up_e, x_e) in enumerate(zip(spans, grad_rows.split(sizes),
                                                                  gate_up.split(sizes), xs.split(sizes))):
                padded = span.padded
                gate, up = gate_up_e[:, :inter], gate_up_e[:, inter:]
                d_hidden = torch.mm(grad_e, w_down[span.expert], out=grad_hidden[:padded])
                act = F.silu(gate)
                if need_down:
                    grad_down.write(i, grad_e.t(), torch.mul(act, up, out=hidden[:padded]))
                d_products = grad_products[:padded]
                torch.ops.aten.silu_backward.grad_input(torch.mul(d_hidden, up, out=scratch[:padded]), gate,
                                                        grad_input=d_products[:, :inter])
                torch.mul(d_hidden, act, out=d_products[:, inter:])
                if need_gate_up:
                    grad_gate_up.write(i, d_products.t(), x_e)
                if need_x:  # grad_e is spent: its rows take the input gradient
                    torch.mm(d_products, w_gate_up[span.expert], out=grad_e)
            if need_x:  # summed in float32 at least, like the forward
                grad_x = xs.new_zeros(grad_out.shape, dtype=torch.promote_types(ctx.x_dtype, torch.float32))
                _sum_rows_into(grad_x, token_of_row, grad_rows)
                grad_x = grad_x[:-1].to(ctx.x_dtype)
        return (grad_x, grad_weights, grad_gate_up and grad_gate_up.buffer, grad_down and grad_down.buffer,
                None, None, None, None)


CHUNK_ROWS = 512  # rows scaled and summed into their tokens per call (a float32 chunk stays in cache)


def _row_maps(token_of_slot: torch.Tensor, spans: list[ExpertSpan], n_rows: int, n_tokens: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """token_of_row [n_rows] (padding rows: `n_tokens`, a dummy token) and row_of_slot [S]."""
    if n_rows == token_of_slot.shape[0]:
        return token_of_slot, torch.arange(n_rows, device=token_of_slot.device)
    row_of_slot = torch.cat([torch.arange(span.row_start, span.row_start + span.count) for span in spans]) \
        .to(token_of_slot.device) if spans else token_of_slot.new_empty(0)
    token_of_row = torch.full((n_rows,), n_tokens, dtype=token_of_slot.dtype, device=token_of_slot.device)
    return token_of_row.index_copy_(0, row_of_slot, token_of_slot), row_of_slot


def _with_zero_row(t: torch.Tensor) -> torch.Tensor:
    """t [N, H] with a row of zeros appended (the dummy token of padding rows)."""
    return torch.cat((t, t.new_zeros(1, t.shape[1])))


def _sum_rows_into(out: torch.Tensor, token_of_row: torch.Tensor, rows: torch.Tensor,
                   weight_of_row: torch.Tensor | None = None) -> None:
    """out[token_of_row[r]] += rows[r] (* weight_of_row[r]) in out's dtype, row by row in order, in
    chunks of `CHUNK_ROWS` rows."""
    n_rows = rows.shape[0]
    chunk = out.new_empty(min(CHUNK_ROWS, n_rows), rows.shape[1])
    for start in range(0, n_rows, CHUNK_ROWS):
        part = slice(start, start + CHUNK_ROWS)
        scaled = chunk[: min(CHUNK_ROWS, n_rows - start)]
        if weight_of_row is not None:
            torch.mul(rows[part], weight_of_row[part].unsqueeze(1), out=scaled)
        elif rows.dtype != out.dtype:
            scaled.copy_(rows[part])
        else:
            scaled = rows[part]
        out.index_add_(0, token_of_row[part], scaled)


def _cast_buffer(weight: torch.Tensor, dtype: torch.dtype, storage: dict[str, torch.UntypedStorage], key: str
                 ) -> torch.Tensor:
    """`weight` itself when it is in `dtype`, else an uninitialised buffer for its copy in `dtype`
    on kept memory (filled expert by expert: rows of experts without tokens are left unset)."""
    if weight.dtype == dtype:
        return weight
    return _kept_buffer(storage, key, weight.shape, dtype, weight.device)


@dataclass(frozen=True)
class ExpertSpan:
    """Where one expert's tokens sit: `count` slots from `slot_start` in the expert-sorted slot order,
    and rows from `row_start` in the row buffers, padded to `padded` rows (the extra rows are zero)."""

    expert: int
    slot_start: int
    count: int
    row_start: int
    padded: int

    @property
    def slots(self) -> slice:
        return slice(self.slot_start, self.slot_start + self.count)

    @property
    def rows(self) -> slice:
        return slice(self.row_start, self.row_start + self.count)

    @property
    def padded_rows(self) -> slice:
        return slice(self.row_start, self.row_start + self.padded)


def row_alignment(device: torch.device, dtype: torch.dtype) -> int:
    """Row multiple each expert's products are padded to.

    On CPU, bf16/fp16 products run through oneDNN, which builds (JIT-compiles) a kernel per distinct
    shape and keeps 1,024 of them. Per-expert token counts change every step, so unpadded products
    keep building kernels: in a training step they ran at half the speed of the same products with
    fixed shapes. Multiples of 16 leave a few dozen shapes, for at most 15 zero rows per expert.
    fp32 products go to MKL, which has no per-shape cost, so they are not padded.
    """
    return 16 if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else 1


def expert_spans(counts: list[int], align: int) -> tuple[list[ExpertSpan], int]:
    """The span of each expert that got tokens, and the number of rows of the padded buffers."""
    spans, slot, row = [], 0, 0
    for expert, count in enumerate(counts):
        if count:
            padded = -(-count // align) * align
            spans.append(ExpertSpan(expert, slot, count, row, padded))
            row += padded
        slot += count
    return spans, row


class _ExpertGrad:
    """The gradient of a stacked expert weight [E, ...], written one expert at a time.

    Rows of experts that got no tokens are zero. When the compute dtype differs from the weight's
    (autocast), each product lands in one small reused buffer and is copied into the row while it
    is still in cache, rather than through a second full-size [E, ...] tensor.

    The memory comes from `storage` (the module's dict) when no tensor uses the one kept there: an
    optimizer step that sets gradients to None frees them, and a fresh tensor of tens of MB costs
    more in page faults (~0.8 ms/MB here) than the products written into it. While a tensor (say a
    `.grad` kept between steps, or one the caller held on to) still uses the kept memory, fresh
    memory is taken and the kept one is left alone.
    """

    def __init__(self, weight: torch.Tensor, spans: list[ExpertSpan], dtype: torch.dtype,
                 storage: dict[str, torch.UntypedStorage], key: str):
        self.buffer = _kept_buffer(storage, key, weight.shape, weight.dtype, weight.device)
        self.experts = [span.expert for span in spans]
        self.scratch = weight.new_empty(weight.shape[1:], dtype=dtype) if dtype != weight.dtype else None
        if len(spans) < weight.shape[0]:
            idle = sorted(set(range(weight.shape[0])) - set(self.experts))
            self.buffer.index_fill_(0, torch.tensor(idle, device=weight.device), 0)

    def write(self, expert_idx: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Row `self.experts[expert_idx]` = a @ b."""
        row = self.buffer[self.experts[expert_idx]]
        if self.scratch is None:
            torch.mm(a, b, out=row)
        else:
            row.copy_(torch.mm(a, b, out=self.scratch))


def _kept_buffer(storage: dict[str, torch.UntypedStorage], key: str, shape: tuple[int, ...] | torch.Size,
                 dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised contiguous tensor on the memory kept in `storage[key]` if it is large enough
    and no tensor uses it any more (its only reference is the dict's), else on fresh memory (kept in
    the dict when it holds none large enough)."""
    kept = storage.get(key)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    fits = kept is not None and kept.device == torch.device(device) and kept.nbytes() >= nbytes
    if fits and use_count is not None and use_count(kept._cdata) == 1:
        return torch.empty(0, dtype=dtype, device=device).set_(kept, 0, shape)
    buffer = torch.empty(shape, dtype=dtype, device=device)
    if not fits:
        storage[key] = buffer.untyped_storage()
    return buffer


def _scratch(spans: list[ExpertSpan], width: int, like: torch.Tensor) -> torch.Tensor:
    """A [largest expert's padded rows, width] buffer of like's dtype and device, reused per expert."""
    return like.new_empty(max((span.padded for span in spans), default=0), width)
