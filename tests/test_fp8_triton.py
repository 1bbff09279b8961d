"""The fused Triton FP8 quantisation (quant/fp8_triton.py) against quantize_blockwise, byte for byte.

Without a GPU the kernels run under Triton's CPU interpreter (``TRITON_INTERPRET=1``, CPU tensors), in
one process of their own (tests/fp8_triton_interpreter.py: the interpreter must be on before triton
is first imported); the tests here build the inputs and compare that process's results. They skip
where triton is not installed (torch's CPU wheels do not bring it; its CUDA wheels do). The CUDA tests
run the compiled kernels on a GPU with e4m3 (compute capability 8.9 or later).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seekformer.quant import fp8_training
from seekformer.quant.fp8 import dequantize_blockwise, quantize_activation, quantize_blockwise
from seekformer.quant.fp8_training import fp8_linear_train

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
FUSED_GPU = HAS_TRITON and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
needs_fused_gpu = pytest.mark.skipif(not FUSED_GPU, reason="needs triton and a CUDA GPU with e4m3 (sm89+)")
BLOCKS = [(1, 128), (128, 128)]
DTYPES = [torch.float32, torch.bfloat16]
TESTS = Path(__file__).resolve().parent


def hard_matrix(rows: int, cols: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    """Gaussian values with the cases quantisation can get wrong: an all-zero 128x128 block and 1x128
    tile, tiny tiles (scale a float32 subnormal), huge ones, float32-subnormal inputs, and rows whose
    one large value pushes the rest into e4m3's subnormals. ``rows`` > 130 and ``cols`` > 130."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * 3
    x[128:, :128] = 0  # an all-zero block (rows 128.. of the first block column)
    x[0, 128:] = 0  # an all-zero 1x128 tile
    x[1] *= 1e-37  # amax / 448 is a float32 subnormal
    x[2] *= 1e30
    x[3] *= 1e-39  # subnormal inputs
    x[4:8, 0] = 3e3  # the rest of these tiles falls into e4m3's subnormal range or to zero
    x[5, :] = x[5, :].round()  # exact values: ties between e4m3 neighbours after scaling
    return x.to(device=device, dtype=dtype)


def assert_same_quantisation(got: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> None:
    (q, s), (q_ref, s_ref) = got, ref
    assert q.dtype == q_ref.dtype == torch.float8_e4m3fn and q.shape == q_ref.shape and q.is_contiguous()
    differ = (q.view(torch.uint8) != q_ref.view(torch.uint8)).nonzero()
    assert differ.numel() == 0, f"{differ.shape[0]} bytes differ, first at {differ[0].tolist()}"
    assert s.dtype == torch.float32 and torch.equal(s, s_ref)


def e4m3_neighbourhoods() -> torch.Tensor:
    """Every positive e4m3 value, the midpoints between neighbours (ties go to the even one) and the
    float32 values just either side of each midpoint, both signs, in rows of 127 after a 448: each
    1x128 tile's scale is exactly 1, so the cast sees these values unchanged."""
    codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mid = (codes[:-1] + codes[1:]) / 2
    values = torch.cat((codes, mid, mid.nextafter(torch.zeros(1)), mid.nextafter(torch.full((1,), 1e3))))
    values = torch.cat((values, -values))
    tiles = torch.nn.functional.pad(values, (0, -values.numel() % 127)).view(-1, 127)
    return torch.cat((torch.full((tiles.shape[0], 1), 448.0), tiles), dim=1)


def non_finite_matrix() -> torch.Tensor:
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(1))
    x[0, 5], x[1, 140], x[2, 7], x[2, 9] = float("nan"), float("inf"), -float("inf"), float("nan")
    return x


def interpreter_cases() -> dict[str, tuple]:
    """name -> (the fp8_triton function, its arguments, the quantize_blockwise result it must equal)."""
    cases = {}
    for dtype in DTYPES:
        for block in BLOCKS:
            for transposed in (False, True):
                x = hard_matrix(131, 300, dtype)
                x = x.t() if transposed else x  # a transposed view is read in place
                cases[f"{dtype}-{block}-{transposed}"] = ("quantize_tiles", (x, block),
                                                          quantize_blockwise(x, block, check_finite=False))
    for block in BLOCKS:  # float16 too (ragged, no extremes: they would be inf there)
        x = (torch.randn(140, 260, generator=torch.Generator().manual_seed(4)) * 3).half()
        cases[f"float16-{block}"] = ("quantize_tiles", (x, block), quantize_blockwise(x, block, check_finite=False))
    for block in BLOCKS:  # a broadcast gradient (stride 0), as y.sum().backward() gives
        x = torch.randn(1, 300, generator=torch.Generator().manual_seed(5)).bfloat16().expand(131, 300)
        cases[f"expanded-{block}"] = ("quantize_tiles", (x, block), quantize_blockwise(x, block, check_finite=False))
    x = e4m3_neighbourhoods()
    cases["neighbourhoods"] = ("quantize_tiles", (x, (1, 128)), quantize_blockwise(x, (1, 128)))
    for block in BLOCKS:
        x = non_finite_matrix()
        cases[f"non-finite-{block}"] = ("quantize_tiles", (x, block), quantize_blockwise(x, block, check_finite=False))
    x = hard_matrix(131, 300, torch.bfloat16, seed=2)
    x_q, x_s = quantize_blockwise(x, (1, 128))
    ref = quantize_blockwise(dequantize_blockwise(x_q, x_s, (1, 128)).t(), (1, 128))
    cases["requantize"] = ("requantize_transposed", (x_q, x_s), ref)
    # scales laid out column by column, as the fused quantisation writes them, read the same
    cases["requantize-column-major-scales"] = ("requantize_transposed", (x_q, x_s.t().contiguous().t()), ref)
    return cases


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, tuple]:
    """name -> (what the interpreted kernel returned, what quantize_blockwise gives)."""
    cases = interpreter_cases()
    tmp = tmp_path_factory.mktemp("fp8_triton")
    torch.save({name: (op, args) for name, (op, args, _) in cases.items()}, tmp / "cases.pt")
    src = str(Path(fp8_training.__file__).resolve().parents[2])
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run([sys.executable, str(TESTS / "fp8_triton_interpreter.py"), str(tmp / "cases.pt"),
                          str(tmp / "results.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = torch.load(tmp / "results.pt")
    return {name: (results[name], ref) for name, (_, _, ref) in cases.items()}


def check_case(interpreted: dict[str, tuple], name: str) -> None:
    got, ref = interpreted[name]
    assert not isinstance(got, str), got  # the kernel raised: its message
    assert_same_quantisation(got, ref)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("transposed", [False, True])
def test_interpreted_kernel_equals_quantize_blockwise(interpreted, dtype, block, transposed) -> None:
    check_case(interpreted, f"{dtype}-{block}-{transposed}")
    if block == (1, 128):  # written column by column for cuBLASLt
        scale = interpreted[f"{dtype}-{block}-{transposed}"][0][1]
        assert scale.stride() == (1, scale.shape[0])


@needs_triton
@pytest.mark.parametrize("block", BLOCKS)
def test_interpreted_kernel_takes_float16_and_broadcast_views(interpreted, block) -> None:
    check_case(interpreted, f"float16-{block}")
    check_case(interpreted, f"expanded-{block}")


@needs_triton
def test_interpreted_cast_rounds_every_e4m3_neighbourhood_like_torch(interpreted) -> None:
    assert (interpreted["neighbourhoods"][1][1] == 1).all()  # the scales are 1: the cast is what is compared
    check_case(interpreted, "neighbourhoods")


@needs_triton
@pytest.mark.parametrize("block", BLOCKS)
def test_interpreted_kernel_matches_non_finite_tiles(interpreted, block) -> None:
    """NaN and inf as quantize_blockwise(check_finite=False) treats them (a NaN tile gets scale 1)."""
    check_case(interpreted, f"non-finite-{block}")


@needs_triton
def test_interpreted_requantisation_of_the_transposed_fp8_copy(interpreted) -> None:
    check_case(interpreted, "requantize")
    check_case(interpreted, "requantize-column-major-scales")


@needs_triton
def test_kernels_reject_what_they_cannot_take() -> None:
    from seekformer.quant import fp8_triton

    with pytest.raises(ValueError, match="block must be"):
        fp8_triton.quantize_tiles(torch.ones(4, 4), (1, 64))
    with pytest.raises(ValueError, match="float32/bf16/fp16"):
        fp8_triton.quantize_tiles(torch.ones(4, 4, dtype=torch.float64), (1, 128))
    with pytest.raises(ValueError, match="scales"):
        fp8_triton.requantize_transposed(torch.ones(4, 4).to(torch.float8_e4m3fn), torch.ones(4, 2))


def compile_for_hopper(x_type: str, whole_block: bool, fp8_input: bool) -> str:
    """PTX of the kernel compiled for sm_90 by triton's own compiler (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from seekformer.quant import fp8_triton

    kernel = fp8_triton._quantize_tiles_kernel
    flags = {"BLOCK_ROWS": 128 if whole_block else 32, "TILE_COLS": 128, "WHOLE_BLOCK": whole_block,
             "FP8_INPUT": fp8_input, "INTERPRETED": False, "BF16_BITS": False}
    pointers = {"x_ptr": x_type, "in_scale_ptr": "*fp32", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}
    signature = {name: pointers.get(name, "constexpr" if name in flags else "i32") for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=flags)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles kernels: not under the interpreter")
@pytest.mark.parametrize("x_type,whole_block,fp8_input", [("*bf16", False, False), ("*fp8e4nv", False, True),
                                                          ("*fp32", True, False)])
def test_compiled_for_hopper_divides_like_torch(x_type, whole_block, fp8_input) -> None:
    """What the interpreter cannot show: on CUDA both divisions are IEEE ``div.rn.f32`` (subnormals
    kept, as torch divides; ``tl.div_rn`` would give ``div.rn.ftz.f32``), nothing else flushes
    subnormals, and the cast is the hardware's round-to-nearest-even one."""
    ptx = compile_for_hopper(x_type, whole_block, fp8_input)
    assert "div.rn.f32" in ptx and "ftz" not in ptx
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
    assert "div.full" not in ptx and "div.approx" not in ptx


def test_cpu_training_does_not_take_the_fused_path() -> None:
    """The fused kernels are for CUDA tensors only: on CPU the torch quantisation runs unchanged."""
    assert fp8_training._fused(torch.ones(4, 128)) is None


# --------------------------------------------------------------------------------------------------
# on a GPU: the reference itself, then the compiled kernels
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
def test_quantize_blockwise_on_cuda_equals_cpu(dtype, block) -> None:
    """The reference gives the same bytes and scales on CUDA as on the CPU. It did not: ``amax / 448``
    with a Python-number divisor is, on CUDA, a multiplication by 448's float32 reciprocal, one ulp
    off amax / 448 for about half of all amax; it now divides by a tensor there too."""
    x = hard_matrix(131, 300, dtype, seed=3)
    q, s = quantize_blockwise(x.cuda(), block, check_finite=False)
    assert_same_quantisation((q.cpu(), s.cpu()), quantize_blockwise(x, block, check_finite=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_quantize_activation_on_cuda_equals_cpu() -> None:
    """The inference simulation's 1x128 tiles: the same bytes and scales on CUDA as on the CPU (its
    division by 448 had the same reciprocal-multiplication difference)."""
    x = hard_matrix(131, 300, torch.float32, seed=4)
    q, s = quantize_activation(x.cuda())
    q_cpu, s_cpu = quantize_activation(x)
    assert torch.equal(s.cpu(), s_cpu) and torch.equal(q.cpu().view(torch.uint8), q_cpu.view(torch.uint8))


@needs_fused_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("transposed", [False, True])
def test_gpu_kernel_equals_quantize_blockwise(dtype, block, transposed) -> None:
    from seekformer.quant import fp8_triton

    for rows, cols in ((131, 300), (1000, 2100), (4096, 1024)):
        x = hard_matrix(rows, cols, dtype, "cuda", seed=rows)
        x = x.t() if transposed else x
        assert_same_quantisation(fp8_triton.quantize_tiles(x, block), quantize_blockwise(x, block, check_finite=False))


@needs_fused_gpu
@pytest.mark.parametrize("block", BLOCKS)
def test_gpu_kernel_matches_non_finite_tiles(block) -> None:
    """NaN and inf tiles: the same scales, and NaN where quantize_blockwise has NaN (the hardware cast
    may give a NaN another sign bit, so the finite bytes are compared)."""
    from seekformer.quant import fp8_triton

    x = non_finite_matrix()
    (q, s), (q_ref, s_ref) = fp8_triton.quantize_tiles(x.cuda(), block), quantize_blockwise(x.cuda(), block,
                                                                                             check_finite=False)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.float().isnan(), q_ref.float().isnan())
    finite = ~q_ref.float().isnan()
    assert torch.equal(q.view(torch.uint8)[finite], q_ref.view(torch.uint8)[finite])


@needs_fused_gpu
def test_gpu_requantisation_of_the_transposed_fp8_copy() -> None:
    from seekformer.quant import fp8_triton

    for rows, cols in ((131, 300), (4096, 1024)):
        x = hard_matrix(rows, cols, torch.float32, "cuda", seed=rows + 1)
        x_q, x_s = fp8_triton.quantize_tiles(x, (1, 128))
        ref = quantize_blockwise(dequantize_blockwise(x_q, x_s, (1, 128)).t(), (1, 128))
        assert_same_quantisation(fp8_triton.requantize_transposed(x_q, x_s), ref)


@needs_fused_gpu
def test_gpu_fp8_linear_takes_the_fused_path_and_gives_the_torch_paths_values(monkeypatch) -> None:
    """fp8_linear_train on CUDA: five fused quantisations and one fused requantisation per forward and
    backward; the same output and gradients, bit for bit, as with the torch quantisation (the GEMMs
    get the same bytes), under bf16 autocast and without; and, without autocast, the CPU emulation's
    within the GEMM's accumulation bound (the rule of test_fp8_training.py's
    test_fp8_linear_on_hopper_equals_the_emulation: 2^-11 of the sum of |products|)."""
    from seekformer.quant import fp8_triton

    calls = {"quantize_tiles": 0, "requantize_transposed": 0}

    def counting(name: str):
        fn = getattr(fp8_triton, name)

        def counted(*args):
            calls[name] += 1
            return fn(*args)
        return counted

    for name in calls:
        monkeypatch.setattr(fp8_triton, name, counting(name))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 70, 300, generator=gen) * 2
    w = torch.randn(384, 300, generator=gen) / 10
    gy = torch.randn(3, 70, 384, generator=gen) / 3

    def run(device: str, autocast: bool) -> tuple[torch.Tensor, ...]:
        xd, wd = x.to(device, copy=True).requires_grad_(), w.to(device, copy=True).requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            y = fp8_linear_train(xd, wd)
        y.backward(gy.to(device, y.dtype))
        return tuple(t.detach().cpu() for t in (y, xd.grad, wd.grad))

    fused = {autocast: run("cuda", autocast) for autocast in (True, False)}
    assert calls == {"quantize_tiles": 10, "requantize_transposed": 2}
    emulated = run("cpu", False)
    monkeypatch.setattr(fp8_training, "_fused_kernels", lambda: None)
    for autocast in (True, False):
        for got, ref in zip(fused[autocast], run("cuda", autocast)):
            assert got.dtype == ref.dtype and torch.equal(got, ref)
    x2, gy2 = x.reshape(-1, 300).double(), gy.reshape(-1, 384).double()
    sums_of_abs_products = ((x2.abs() @ w.double().abs().t()).reshape(gy.shape),
                            (gy2.abs() @ w.double().abs()).reshape(x.shape), gy2.abs().t() @ x2.abs())
    for got, ref, sums in zip(fused[False], emulated, sums_of_abs_products):
        assert ((got.double() - ref.double()).abs() <= 2**-11 * sums).all()
