"""FP8 GEMMs on a Hopper GPU: cuBLASLt's block-scaled kernel against bf16 `torch.mm` and the emulation.

    PYTHONPATH=src python benchmarks/fp8_gemm_cuda.py

For DeepSeek-V3-sized products (7168 hidden, 2048 expert width, 4096 tokens) it times, with CUDA events
(median of 20 after 5 warm-ups):

* `bf16 mm`: `torch.mm` of bf16 operands (the baseline a bf16 trainer runs);
* `fp8 kernel`: `fp8_gemm` on already-quantised operands (cuBLASLt, 1x128 x 128x128 or 1x128 x 1x128);
* `fp8 emulated`: the chunked float32 emulation on the same GPU (what ran on CUDA before);
* `fp8 linear fwd+bwd` against `F.linear` fwd+bwd under bf16 autocast: the whole FP8 recipe of one
  layer (quantisation of activations, weights and gradients included).

and the largest error of the kernel against a float64 product of the same quantised operands,
relative to the sum of |products|. Prints a markdown table; needs a CUDA device.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from seekformer.quant.fp8 import quantize_blockwise
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


def main() -> int:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/fp8_gemm_cuda.py needs a CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"block-scaled kernel: {uses_block_scaled_kernel('cuda')}")
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
    print("| layer (tokens x in -> out) | bf16 F.linear fwd+bwd ms | fp8 linear fwd+bwd ms | fp8 / bf16 time |")
    print("|---|---|---|---|")
    for tokens, k, n in ((4096, 7168, 7168), (4096, 7168, 2048), (8192, 8192, 8192)):
        x = torch.randn(tokens, k, device="cuda", requires_grad=True)
        w = torch.nn.Parameter(torch.randn(n, k, device="cuda") / k**0.5)
        gy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)

        def step(fn):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = fn(x, w)
            y.backward(gy)

        t_bf16 = cuda_ms(lambda: step(F.linear), repeats=10)
        t_fp8 = cuda_ms(lambda: step(fp8_linear_train), repeats=10)
        print(f"| {tokens} x {k} -> {n} | {t_bf16:.2f} | {t_fp8:.2f} | {t_fp8 / t_bf16:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
