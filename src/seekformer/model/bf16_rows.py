"""Few-row bf16 matrix products for decoding on CPUs with AVX512-BF16 (`bf16_rows.c`).

A decode step of a 64-expert MoE layer runs ~45 experts over ~3 rows each. oneDNN's packed products
(`packed_weights.py`) cost ~15-20 us per call before any arithmetic (argument handling, primitive
lookup, scratchpad; measured on a 64 x 64 product), so the ~90 calls of a step spent more time in
setup than in reading the 34 MB of expert weights. `grouped_rows` runs every expert of a layer in one
call of a small C kernel over weights packed in its own layout ([N/16][K/2][16][2]: one AVX512-BF16
dot-product instruction per pair of inputs and 16 outputs), with float32 accumulation and one
rounding to bf16, like oneDNN's products.

The kernel is compiled on first use with the system's C compiler (`cc`, or `$CC`) into
`$SEEKFORMER_CACHE/kernels` (default `~/.cache/seekformer/kernels`), keyed by a hash of its source
and flags, and loaded with ctypes. Without a compiler, on a CPU without AVX512-BF16, or with
`SEEKFORMER_BF16_ROWS=0`, `available()` is False and callers keep oneDNN's products.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("bf16_rows.c")
# no contraction of products and sums into fused multiply-adds: the RoPE kernel rounds like PyTorch's
FLAGS = ["-O3", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared",
         "-fPIC"]
BLOCK = 16  # outputs per packed block
# rows of x up to which `rows` / `grouped_rows` beat oneDNN's products (1-thread timings, 2-core CPU:
# 1.0-1.4x faster up to 128 rows of [512..1408, 192..1408] weights, up to 2x slower at 256+ rows)
MAX_ROWS = 128

_library: ctypes.CDLL | None = None
_loaded = False
_load_lock = threading.Lock()  # a second thread waits for the first one's build instead of falling back


def available() -> bool:
    """Whether the kernel can run here (built, loaded, and the CPU has AVX512-BF16)."""
    return _load() is not None


def _cache_dir() -> Path:
    root = os.environ.get("SEEKFORMER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "seekformer")
    return Path(root) / "kernels"


def _load() -> ctypes.CDLL | None:
    global _library, _loaded
    if not _loaded:
        with _load_lock:
            if not _loaded:
                _library = _build()
                _loaded = True
    return _library


def _build() -> ctypes.CDLL | None:
    """The kernel library, compiled here unless cached; None where it cannot run."""
    if os.environ.get("SEEKFORMER_BF16_ROWS", "1") == "0" or not torch.backends.cpu.get_cpu_capability().startswith(
            "AVX512"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"bf16_rows_{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True,
                               timeout=120)
                os.replace(built, target)  # atomic: a concurrent build writes the same bytes
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        warnings.warn(f"seekformer: the bf16 few-row kernel could not be built ({error}); decoding uses "
                      f"oneDNN's products", RuntimeWarning, stacklevel=3)
        return None
    if not library.sf_bf16_rows_supported():
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    library.sf_bf16_grouped_rows.argtypes = [p, i64, p, i64, p, i64, i64, p, ctypes.c_int]
    library.sf_bf16_grouped_rows.restype = None
    library.sf_bf16_rows.argtypes = [p, i64, i64, p, i64, p, ctypes.c_int]
    library.sf_bf16_rows.restype = None
    library.sf_latent_attention.argtypes = [p, i64, i64, i64, p, i64, i64, i64, p, i64, i64, ctypes.c_float, p, p,
                                            ctypes.c_int]
    library.sf_latent_attention.restype = None
    library.sf_bf16_rms_norm.argtypes = [p, i64, i64, i64, p, ctypes.c_float, p, ctypes.c_int]
    library.sf_bf16_rms_norm.restype = None
    library.sf_bf16_rope_pairs.argtypes = [p, i64, i64, i64, i64, i64, p, p, p]
    library.sf_bf16_rope_pairs.restype = None
    library.sf_bf16_pack.argtypes = [p, i64, i64, i64, p, ctypes.c_int]
    library.sf_bf16_pack.restype = None
    library.sf_bf16_pack_f32.argtypes = [p, i64, i64, i64, p, p, ctypes.c_int]
    library.sf_bf16_pack_f32.restype = None
    return library


def packable(weight: torch.Tensor) -> bool:
    """Whether a weight [..., N, K] fits the kernel's layout (N a multiple of 16, K even, CPU)."""
    return (weight.device.type == "cpu" and weight.dim() >= 2 and weight.shape[-2] % BLOCK == 0
            and weight.shape[-1] % 2 == 0)


def packed_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """Shape of `pack(weight)` for weight [..., N, K]: [..., N/16, K/2, 16, 2], which records N and K;
    the elements are in the kernel's order (see `pack`)."""
    *lead, N, K = weight.shape
    return (*lead, N // BLOCK, K // 2, BLOCK, 2)


def pack(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """weight [..., N, K] in the kernel's bf16 layout, written into `out` when given (no fresh memory:
    a refresh between rollouts). Per group of 64 outputs (4 blocks of 16; the last group may have
    fewer), for each pair of inputs, the group's blocks side by side, each 16 outputs x 2 inputs: a
    group is one sequential stream of the matrix ([N/64][K/2][4][16][2] when N is a multiple of 64)."""
    library = _library_or_raise()
    if not packable(weight):
        raise ValueError(f"pack: weight {tuple(weight.shape)} on {weight.device} is not packable (rows a multiple "
                         f"of {BLOCK}, an even number of columns, on the CPU)")
    *lead, N, K = weight.shape
    shape = packed_shape(weight)
    if out is None:
        out = torch.empty(shape, dtype=torch.bfloat16, device=weight.device)
    elif out.shape != shape or out.dtype != torch.bfloat16 or not out.is_contiguous():
        raise ValueError(f"pack: out {tuple(out.shape)} {out.dtype} cannot hold weight {tuple(weight.shape)}")
    source = weight.detach().to(torch.bfloat16).contiguous()  # a copy only for other dtypes or layouts
    library.sf_bf16_pack(source.data_ptr(), source.numel() // (N * K), N, K, out.data_ptr(), torch.get_num_threads())
    return out


def pack_float(weight: torch.Tensor, plain: torch.Tensor, out: torch.Tensor) -> None:
    """`plain.copy_(weight)` then `pack(plain, out=out)` in one pass over the float32 `weight` [..., N, K]:
    the same bytes (rounded to nearest even as PyTorch rounds), each group of rows packed while its
    bf16 copy is in cache. GRPO's refresh of its bf16 rollout copy from the float32 policy."""
    library = _library_or_raise()
    *_, N, K = weight.shape
    if (weight.dtype != torch.float32 or not weight.is_contiguous() or plain.shape != weight.shape
            or plain.dtype != torch.bfloat16 or not plain.is_contiguous() or out.shape != packed_shape(weight)
            or out.dtype != torch.bfloat16 or not out.is_contiguous() or not packable(weight)):
        raise ValueError(f"pack_float: weight {tuple(weight.shape)} {weight.dtype}, plain {tuple(plain.shape)} "
                         f"{plain.dtype} and out {tuple(out.shape)} {out.dtype} do not match")
    library.sf_bf16_pack_f32(weight.data_ptr(), weight.numel() // (N * K), N, K, plain.data_ptr(), out.data_ptr(),
                             torch.get_num_threads())
    torch.autograd.graph.increment_version(plain)  # written through its pointer: tell autograd and the packs


def _library_or_raise() -> ctypes.CDLL:
    library = _load()
    if library is None:
        raise RuntimeError("the bf16 few-row kernel is not available here (see bf16_rows.available())")
    return library


def rows(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [..., K] (bf16) times a weight [N, K] packed [N/16, K/2, 16, 2] by `pack`: [..., N] bf16."""
    library = _library_or_raise()
    blocks, half = packed.shape[:2]
    K, N = x.shape[-1], blocks * BLOCK
    if (x.dtype != torch.bfloat16 or packed.dtype != torch.bfloat16 or packed.dim() != 4 or K != 2 * half
            or packed.shape[2:] != (BLOCK, 2) or not packed.is_contiguous()):
        raise ValueError(f"rows: x {tuple(x.shape)} {x.dtype} does not match packed {tuple(packed.shape)} "
                         f"{packed.dtype}")
    flat = x.reshape(-1, K).contiguous()
    out = torch.empty(flat.shape[0], N, dtype=torch.bfloat16, device=x.device)
    if flat.shape[0]:
        library.sf_bf16_rows(flat.data_ptr(), flat.shape[0], K, packed.data_ptr(), N, out.data_ptr(),
                             torch.get_num_threads())
    return out.view(*x.shape[:-1], N)


def grouped_rows(x: torch.Tensor, counts: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """[S, N] bf16: the rows of x [S, K] (bf16, sorted by group, counts [G] int64 rows per group)
    each through its group's weight, packed [G, N/16, K/2, 16, 2] by `pack`."""
    library = _library_or_raise()
    G, blocks, half = packed.shape[:3]
    S, K = x.shape
    if (x.dtype != torch.bfloat16 or packed.dtype != torch.bfloat16 or packed.dim() != 5 or K != 2 * half
            or packed.shape[3:] != (BLOCK, 2) or counts.shape != (G,)):
        raise ValueError(f"grouped_rows: x {tuple(x.shape)} {x.dtype}, packed {tuple(packed.shape)} {packed.dtype}, "
                         f"counts {tuple(counts.shape)} do not match")
    x, counts = x.contiguous(), counts.to(device="cpu", dtype=torch.int64).contiguous()
    if not packed.is_contiguous():
        raise ValueError("grouped_rows: packed weights must be contiguous")
    rows_per_group = counts.numpy()  # (a view: checked without torch's per-operator cost in a decode step)
    if rows_per_group.sum() != S or rows_per_group.min(initial=0) < 0:  # the kernel reads and writes by these
        raise ValueError(f"grouped_rows: counts {counts.tolist()} do not add up to the {S} rows of x")
    N = blocks * BLOCK
    out = torch.empty(S, N, dtype=torch.bfloat16, device=x.device)
    if S:
        library.sf_bf16_grouped_rows(x.data_ptr(), K, counts.data_ptr(), G, packed.data_ptr(), blocks * half * 32,
                                     N, out.data_ptr(), torch.get_num_threads())
    return out


def latent_attention(q: torch.Tensor, latent: torch.Tensor, r: int, scale: float,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q latent^T * scale) latent[..., :r] for q [B, T, H, D] over latent [B, S, D] -> [B, T, H, r]
    (bf16), `mask` [B|1, 1, T, S] (True = may attend) or None (every query sees every key): MLA's
    absorbed attention, the latent being key and value. Scores and softmax in float32 from exact bf16
    products, one rounding of the output; the latent is read in place (its rows must be contiguous,
    e.g. a `KVCache` buffer's first S slots)."""
    library = _library_or_raise()
    B, T, H, D = q.shape
    S = latent.shape[1]
    if (q.dtype != torch.bfloat16 or latent.dtype != torch.bfloat16 or latent.shape[0] != B or latent.shape[2] != D
            or latent.stride(2) != 1 or latent.stride(1) != D or not 0 < r <= D):
        raise ValueError(f"latent_attention: q {tuple(q.shape)} {q.dtype} and latent {tuple(latent.shape)} "
                         f"{latent.dtype} (strides {latent.stride()}) do not match")
    q = q.contiguous()
    out = torch.empty(B, T, H, r, dtype=torch.bfloat16, device=q.device)
    mask_bytes, mask_stride = None, 0
    if mask is not None:
        mask_bytes = mask.reshape(mask.shape[0], T, S).to(torch.uint8).contiguous()
        mask_stride = T * S if mask.shape[0] > 1 else 0
    threads = torch.get_num_threads()
    scores = torch.empty(threads, max(S, 1), dtype=torch.float32)
    library.sf_latent_attention(q.data_ptr(), B, T * H, D, latent.data_ptr(), latent.stride(0), S, r,
                                None if mask_bytes is None else mask_bytes.data_ptr(), mask_stride, H, scale,
                                out.data_ptr(), scores.data_ptr(), threads)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`layers.RMSNorm` of bf16 x [..., dim] (rows may be strided, the last dim contiguous) with a bf16
    weight [dim], in one call: float32 statistics (summed in another order than PyTorch's, so a
    result may differ by one bf16 rounding step), x normalised and rounded to bf16, times the weight."""
    library = _library_or_raise()
    dim = x.shape[-1]
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or weight.shape != (dim,):
        raise ValueError(f"rms_norm: x {tuple(x.shape)} {x.dtype} and weight {tuple(weight.shape)} {weight.dtype} "
                         f"do not match")
    flat = x.reshape(-1, dim) if x.stride(-1) == 1 else x.contiguous().view(-1, dim)
    if flat.shape[0] > 1 and flat.stride(0) < dim:
        flat = flat.contiguous()
    weight = weight.contiguous()
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    if flat.shape[0]:
        library.sf_bf16_rms_norm(flat.data_ptr(), flat.shape[0], dim, flat.stride(0), weight.data_ptr(), eps,
                                 out.data_ptr(), torch.get_num_threads())
    return out


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`layers.apply_rope(x, cos, sin, pairwise=True)` for bf16 x [..., H, D] (each head's D values
    contiguous) and float32 cos, sin [..., D/2], in one call: adjacent pairs rotated in float32 and
    written back as [first of each pair ; second], contiguous [..., H, D] bf16."""
    library = _library_or_raise()
    *lead, H, D = x.shape
    if (x.dtype != torch.bfloat16 or D % 2 or cos.dtype != torch.float32 or sin.dtype != torch.float32
            or tuple(cos.shape) != (*lead, D // 2) or sin.shape != cos.shape):
        raise ValueError(f"rope_pairs: x {tuple(x.shape)} {x.dtype} and cos/sin {tuple(cos.shape)} {cos.dtype} "
                         f"do not match")
    flat = x.reshape(-1, H, D) if x.stride(-1) == 1 else x.contiguous().view(-1, H, D)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    cos, sin = cos.reshape(-1, D // 2).contiguous(), sin.reshape(-1, D // 2).contiguous()
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    if flat.shape[0] and H:
        library.sf_bf16_rope_pairs(flat.data_ptr(), flat.shape[0], H, D, flat.stride(0), flat.stride(1),
                                   cos.data_ptr(), sin.data_ptr(), out.data_ptr())
    return out
