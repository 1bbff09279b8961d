"""FP8 GEMMs on a Hopper GPU: cuBLASLt's block-scaled kernel against bf16 `torch.mm` and the emulation.

    PYTHONPATH=src python benchmarks/fp8_gemm_cuda.py

For DeepSeek-V3-sized products (7168 hidden, 2048 expert width, 4096 tokens) it times, with CUDA events
(median of 20 after 5 warm-ups):

* `bf16 mm`: `torch.mm` of bf16 operands (the baseline a bf16 trainer runs);
* `fp8 kernel`: `fp8_gemm` on already-quantised operands (cuBLASLt, 1x128 x 128x128 or 1x128 x 1x128);
* `fp8 emulated`: the chunked float32 emulation on the same GPU (what ran on CUDA before);
* `fp8 linear fwd+bwd` against `F.linear` fwd+bwd under bf16 autocast: the whole FP8 recipe of one
  layer (quantisation of activations, weights and gradients included), with the fused Triton
  quantisation (`quant/fp8_triton.py`, the default on CUDA where triton imports) and with the torch
  quantisation it replaces (`quantize_blockwise`);
* each quantisation of that recipe alone, fused against torch, with the fused kernel's bytes moved per
  second and a check that both give the same bytes and scales.

`--skip-gemm` leaves out the GEMM table.

and the largest error of the kernel against a float64 product of the same quantised operands,
relative to the sum of |products|. Prints a markdown table; needs a CUDA device.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch
import torch.nn.functional as F

from seekformer.quant import fp8_training
from seekformer.quant.fp8 import dequantize_blockwise, quantize_blockwise
from seekformer.quant.fp8_gemm import _emulated, fp8_gemm, uses_block_scaled_kernel
from seekformer.quant.fp8_training import fp8_linear_train

SHAPES = [  # (M, N, K, tiles of B): fprop of a 7168 -> 7168 projection, expert up and down, a wgrad
    (4096, 7168, 7168, 128), (4096, 4096, 7168, 128), (4096, 7168, 2048, 128), (7168, 2048, 4096, 1),
    (8192, 8192, 8192, 128),
]


def cuda_ms(fn, repeats: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def relative_error(m: int, n: int, k: int, b_rows: int) -> float:
    """max |kernel - float64| / (|A| |B|) over the output, on the GPU in float64."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(m, k, device="cuda", generator=gen)
    b = torch.randn(n, k, device="cuda", generator=gen)
    a_q, a_s = quantize_blockwise(a, (1, 128))
    b_q, b_s = quantize_blockwise(b, (b_rows, 128))
    ad = (a_q.double().view(m, -1, 128) * a_s.double().unsqueeze(-1)).view(m, k)
    bd = b_q.double() * b_s.double().repeat_interleave(b_rows, 0)[:n].repeat_interleave(128, 1)[:, :k]
    err = (fp8_gemm(a_q, a_s, b_q, b_s, 1, b_rows).double() - ad @ bd.t()).abs()
    return (err / (ad.abs() @ bd.abs().t())).max().item()


@contextlib.contextmanager
def torch_quantisation():
    """fp8_training without the fused kernels: the torch quantisation runs, as before them."""
    kernels = fp8_training._fused_kernels
    fp8_training._fused_kernels = lambda: None
    try:
        yield
    finally:
        fp8_training._fused_kernels = kernels


def quantisation_table(fused) -> None:
    """Each quantisation of one FP8 linear's forward and backward (4096 tokens, 7168 -> 7168), fused
    against the torch code, and whether the bytes and scales agree."""
    tokens, k, n = 4096, 7168, 7168
    x = torch.randn(tokens, k, device="cuda")  # the master-precision input of the benchmark's layer
    w = torch.randn(n, k, device="cuda") / k**0.5
    g = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
    x_q, x_s = quantize_blockwise(x, (1, 128), check_finite=False)
    cases = [  # name, fused, torch, bytes the fused kernel reads and writes
        ("X fp32 [4096, 7168], 1x128", lambda: fused.quantize_tiles(x, (1, 128)),
         lambda: quantize_blockwise(x, (1, 128), check_finite=False), x.numel() * (4 + 1)),
        ("W fp32 [7168, 7168], 128x128", lambda: fused.quantize_tiles(w, (128, 128)),
         lambda: quantize_blockwise(w, (128, 128), check_finite=False), w.numel() * (4 + 1)),
        ("Wᵀ blocks (dgrad), read in place", lambda: fused.quantize_tiles(w.t(), (128, 128)),
         lambda: (lambda q, s: (q.t().contiguous(), s.t()))(*quantize_blockwise(w, (128, 128), check_finite=False)),
         w.numel() * (4 + 1)),
        ("dY bf16 [4096, 7168], 1x128", lambda: fused.quantize_tiles(g, (1, 128)),
         lambda: quantize_blockwise(g, (1, 128), check_finite=False), g.numel() * (2 + 1)),
        ("dYᵀ 1x128 along tokens (wgrad)", lambda: fused.quantize_tiles(g.t(), (1, 128)),
         lambda: quantize_blockwise(g.t(), (1, 128), check_finite=False), g.numel() * (2 + 1)),
        ("Xᵀ from X's FP8 copy (wgrad)", lambda: fused.requantize_transposed(x_q, x_s),
         lambda: quantize_blockwise(dequantize_blockwise(x_q, x_s, (1, 128)).t(), (1, 128), check_finite=False),
         x.numel() * (1 + 1)),
    ]
    print("| quantisation | torch ms | fused ms | torch / fused | fused GB/s | same bytes and scales |")
    print("|---|---|---|---|---|---|")
    for name, fn_fused, fn_torch, nbytes in cases:
        (q, s), (q_ref, s_ref) = fn_fused(), fn_torch()
        same = torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
        t_fused, t_torch = cuda_ms(fn_fused), cuda_ms(fn_torch)
        print(f"| {name} | {t_torch:.3f} | {t_fused:.3f} | {t_torch / t_fused:.2f}x | {nbytes / t_fused / 1e6:.0f} "
              f"| {'yes' if same else 'NO'} |")
    print()


def gemm_table() -> None:
    print("| M x N x K | B tiles | bf16 mm TFLOP/s | fp8 kernel TFLOP/s | kernel / bf16 | fp8 emulated TFLOP/s "
          "| kernel max rel. error |")
    print("|---|---|---|---|---|---|---|")
    for m, n, k, b_rows in SHAPES:
        flop = 2 * m * n * k
        a, b = torch.randn(m, k, device="cuda"), torch.randn(n, k, device="cuda")
        a16, b16 = a.bfloat16(), b.bfloat16()
        a_q, a_s = quantize_blockwise(a, (1, 128))
        b_q, b_s = quantize_blockwise(b, (b_rows, 128))
        t_bf16 = cuda_ms(lambda: torch.mm(a16, b16.t()))
        t_fp8 = cuda_ms(lambda: fp8_gemm(a_q, a_s, b_q, b_s, 1, b_rows))
        t_emu = cuda_ms(lambda: _emulated(a_q, a_s, b_q, b_s, 1, b_rows), repeats=5, warmup=1)
        err = relative_error(min(m, 1024), n, k, b_rows)
        print(f"| {m} x {n} x {k} | 1x128 x {b_rows}x128 | {flop / t_bf16 / 1e9:.0f} | {flop / t_fp8 / 1e9:.0f} "
              f"| {t_bf16 / t_fp8:.2f}x | {flop / t_emu / 1e9:.0f} | {err:.1e} |")
    print()


def linear_table(with_fused: bool) -> None:
    print("| layer (tokens x in -> out) | bf16 F.linear fwd+bwd ms | fp8 linear, torch quantisation ms "
          "| fp8 linear, fused quantisation ms | torch-quantised / bf16 | fused / bf16 |")
    print("|---|---|---|---|---|---|")
    for tokens, k, n in ((4096, 7168, 7168), (4096, 7168, 2048), (8192, 8192, 8192)):
        x = torch.randn(tokens, k, device="cuda", requires_grad=True)
        w = torch.nn.Parameter(torch.randn(n, k, device="cuda") / k**0.5)
        gy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)

        def step(fn):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = fn(x, w)
            y.backward(gy)

        t_bf16 = cuda_ms(lambda: step(F.linear), repeats=10)
        with torch_quantisation():
            t_torch = cuda_ms(lambda: step(fp8_linear_train), repeats=10)
        t_fused = cuda_ms(lambda: step(fp8_linear_train), repeats=10) if with_fused else float("nan")
        print(f"| {tokens} x {k} -> {n} | {t_bf16:.2f} | {t_torch:.2f} | {t_fused:.2f} | {t_torch / t_bf16:.2f}x "
              f"| {t_fused / t_bf16:.2f}x |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-gemm", action="store_true", help="leave out the GEMM table")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/fp8_gemm_cuda.py needs a CUDA device")
    fused = fp8_training._fused(torch.ones(1, 1, device="cuda"))  # None without triton or e4m3
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"block-scaled kernel: {uses_block_scaled_kernel('cuda')}, fused quantisation: {fused is not None}")
    if fused is not None:
        quantisation_table(fused)
    if not args.skip_gemm:
        gemm_table()
    linear_table(fused is not None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
