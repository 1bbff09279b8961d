"""FP8 GEMM emulation and V3's FP8 training recipe, against float64 references."""

from __future__ import annotations

import pytest
import torch
from conftest import step_losses, tiny_run_config

from seekformer.config import PRESETS, ModelConfig
from seekformer.model.layers import MLP
from seekformer.model.moe import Experts
from seekformer.model.transformer import Transformer
from seekformer.quant.fp8 import quantize_blockwise
from seekformer.quant.fp8_gemm import fp8_gemm, uses_block_scaled_kernel
from seekformer.quant.fp8_training import (
    FP8TrainingExperts,
    FP8TrainingLinear,
    FP8TrainingMLP,
    convert_to_fp8_training,
    fp8_linear_train,
    fp8_swiglu_linear_train,
    saved_activation_bytes,
)
from seekformer.training.pretrain import Trainer


def _dequant64(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float64 dequantisation by an explicit loop over tiles (independent of the library's)."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows = slice(i * block[0], (i + 1) * block[0])
            cols = slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = q[rows, cols].double() * float(s[i, j])
    return out


def test_quantized_tiles_within_e4m3_precision() -> None:
    """Per 1x128 tile and per 128x128 block: the largest magnitude maps to 448 and every element
    round-trips within e4m3's half ulp (2^-4 relative) unless it falls in e4m3's subnormal range."""
    x = torch.randn(70, 300, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 300)
    for block in ((1, 128), (128, 128)):
        q, s = quantize_blockwise(x, block)
        back = _dequant64(q, s, block)
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                tile = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
                ref, got, scale = x[tile].double(), back[tile], float(s[i, j])
                assert q[tile].float().abs().max() == 448.0
                err = (got - ref).abs()
                normal = ref.abs() >= 2**-6 * scale  # e4m3's smallest normal, scaled
                assert (err[normal] <= 2**-4 * ref.abs()[normal]).all()
                assert (err[~normal] <= 2**-10 * scale).all()  # subnormal spacing 2^-9, half of it


@pytest.mark.parametrize("m,n,k", [(33, 50, 100), (130, 257, 300), (5, 128, 512)])
def test_fp8_gemm_equals_float64_of_same_operands(m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m + n + k)
    a = torch.randn(m, k, generator=gen) * 5
    b = torch.randn(n, k, generator=gen) / 7
    a_q, a_s = quantize_blockwise(a, (1, 128))
    b_q, b_s = quantize_blockwise(b, (128, 128))
    ref = _dequant64(a_q, a_s, (1, 128)) @ _dequant64(b_q, b_s, (128, 128)).t()
    got = fp8_gemm(a_q, a_s, b_q, b_s, 1, 128)
    assert got.dtype == torch.float32
    # float32 summation rounding only: within a few ulps of the row/column magnitudes
    bound = 1e-6 * (_dequant64(a_q, a_s, (1, 128)).abs() @ _dequant64(b_q, b_s, (128, 128)).abs().t())
    assert ((got.double() - ref).abs() <= bound + 1e-30).all()
    # the products are far from the unquantised ones: this is FP8, not float32
    assert (got.double() - a.double() @ b.double().t()).abs().max() > 100 * (got.double() - ref).abs().max()


def test_fp8_gemm_promotes_per_128_chunk() -> None:
    """A chunk of huge values next to a chunk of tiny ones: each chunk has its own scale, so the
    tiny chunk's contribution survives (one per-row scale over all of K would flush it to zero)."""
    a = torch.cat((torch.full((1, 128), 1e4), torch.full((1, 128), 1e-4)), dim=1)
    b = torch.cat((torch.zeros(1, 128), torch.ones(1, 128)), dim=1)
    a_q, a_s = quantize_blockwise(a, (1, 128))
    b_q, b_s = quantize_blockwise(b, (128, 128))
    assert fp8_gemm(a_q, a_s, b_q, b_s, 1, 128).item() == pytest.approx(128e-4, rel=2**-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA"))])
def test_fp8_gemm_rounds_once_to_the_output_dtype(device: str) -> None:
    gen = torch.Generator().manual_seed(1)
    a_q, a_s = quantize_blockwise(torch.randn(40, 256, generator=gen), (1, 128))
    b_q, b_s = quantize_blockwise(torch.randn(96, 256, generator=gen), (128, 128))
    args = [t.to(device) for t in (a_q, a_s, b_q, b_s)]
    full = fp8_gemm(*args, 1, 128)
    half = fp8_gemm(*args, 1, 128, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32
    if device == "cpu":
        assert not uses_block_scaled_kernel(device)  # the emulation: one rounding of its float32 result
        assert torch.equal(half, full.to(torch.bfloat16))
    else:  # the kernel's own epilogue: within one bf16 rounding of its float32 result
        torch.testing.assert_close(half.float(), full, rtol=2**-8, atol=0)


def test_training_quantisation_lets_a_nan_through_instead_of_waiting_to_check() -> None:
    x = torch.randn(4, 256)
    x[1, 200] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values in block \(1, 1\)"):
        quantize_blockwise(x, (1, 128))
    q, s = quantize_blockwise(x, (1, 128), check_finite=False)
    assert q.float().isnan().nonzero().tolist() == [[1, 200]]
    w_q, w_s = quantize_blockwise(torch.randn(8, 256), (128, 128))
    y = fp8_gemm(q, s, w_q, w_s, 1, 128)
    assert y[1].isnan().all() and y[[0, 2, 3]].isfinite().all()


def test_fp8_gemm_rejects_bad_operands() -> None:
    q, s = quantize_blockwise(torch.randn(4, 200), (1, 128))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_gemm(q.float(), s, q, s, 1, 1)
    with pytest.raises(ValueError, match="columns"):
        fp8_gemm(q, s[:, :1], q, s, 1, 1)


def test_fp8_linear_gradients_match_float64_of_same_quantised_operands() -> None:
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 70, 200, generator=gen) * 2).requires_grad_()
    w = (torch.randn(150, 200, generator=gen) / 10).requires_grad_()
    b = torch.randn(150, generator=gen).requires_grad_()
    gy = torch.randn(3, 70, 150, generator=gen) / 3
    y = fp8_linear_train(x, w, b)
    y.backward(gy)

    x2, g2 = x.detach().reshape(-1, 200), gy.reshape(-1, 150)
    act, blk = (1, 128), (128, 128)
    xd = _dequant64(*quantize_blockwise(x2, act), act)
    wd = _dequant64(*quantize_blockwise(w.detach(), blk), blk)
    y_ref = xd @ wd.t() + b.detach().double()
    # dgrad: dY tiled along N; W in 128x128 blocks
    gx_ref = _dequant64(*quantize_blockwise(g2, act), act) @ wd
    # wgrad: dY^T and X^T tiled along the tokens, X^T re-quantised from the FP8 copy of X
    gt = _dequant64(*quantize_blockwise(g2.t(), act), act)
    xt = _dequant64(*quantize_blockwise(xd.float().t(), act), act)
    gw_ref = gt @ xt.t()
    for got, ref in ((y.reshape(-1, 150), y_ref), (x.grad.reshape(-1, 200), gx_ref), (w.grad, gw_ref)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(b.grad.double(), g2.double().sum(0), rtol=1e-6, atol=1e-6)
    # and within FP8 precision of exact float64 calculus
    exact_gw = g2.double().t() @ x2.double()
    assert (w.grad.double() - exact_gw).norm() / exact_gw.norm() < 0.08
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_fp8_linear_under_autocast_outputs_bf16_and_saves_fp8() -> None:
    x = torch.randn(64, 256, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(128, 256) / 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp8_bytes, fp8_elements = saved_activation_bytes(lambda: fp8_linear_train(x, w).sum().backward())
        bf16_bytes, none = saved_activation_bytes(lambda: torch.nn.functional.linear(x, w).float().sum().backward())
        y = fp8_linear_train(x, w)
    assert y.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert fp8_bytes == 64 * 256 + 64 * 2 * 4  # e4m3 input + one float32 scale per 128
    assert fp8_elements == 64 * 256 and none == 0
    assert bf16_bytes >= 2 * 64 * 256  # at least the bf16 input (and autocast's bf16 weight copy)


def _tiny_v3() -> Transformer:
    cfg = ModelConfig(**{**PRESETS["tiny-v3"], "num_hidden_layers": 2})
    return Transformer(cfg)


def test_convert_swaps_exactly_the_hub_fp8_layers() -> None:
    model = _tiny_v3()
    before = dict(model.named_parameters())
    swapped = set(convert_to_fp8_training(model))
    assert dict(model.named_parameters()) == before  # the very same parameter objects
    fp8_linears = {n for n, m in model.named_modules() if isinstance(m, FP8TrainingLinear)}
    assert "model.layers.0.self_attn.kv_b_proj" in fp8_linears
    assert "model.layers.0.mlp.down_proj" in fp8_linears
    assert "model.layers.1.mlp.shared_experts.up_proj" in fp8_linears
    assert "mtp.0.self_attn.o_proj" in fp8_linears
    assert not any(n.endswith(("lm_head", "eh_proj", "mlp.gate")) for n in fp8_linears)
    experts = {n for n, m in model.named_modules() if isinstance(m, FP8TrainingExperts)}
    assert experts == {"model.layers.1.mlp.experts", "mtp.0.mlp.experts"}
    mlps = {n for n, m in model.named_modules() if isinstance(m, FP8TrainingMLP)}
    assert mlps == {"model.layers.0.mlp", "model.layers.1.mlp.shared_experts", "mtp.0.mlp.shared_experts"}
    assert swapped == fp8_linears | experts | mlps
    assert convert_to_fp8_training(model) == []  # idempotent


def test_fp8_experts_match_float64_experts_of_quantised_weights() -> None:
    """The FP8 experts path against the reference expert loop with FP8 GEMMs replaced by float64
    products of the same quantised operands (forward only; the gradients are the linear's)."""
    model = _tiny_v3()
    moe = model.model.layers[1].mlp
    x = torch.randn(40, moe.experts.gate_up_proj.shape[2])
    route = moe.gate(x)
    fp8 = FP8TrainingExperts.from_experts(moe.experts)
    got = fp8(x, route)
    act, blk = (1, 128), (128, 128)
    ref = torch.zeros(40, x.shape[1], dtype=torch.float64)
    for t in range(40):
        for slot in range(route.indices.shape[1]):
            e = int(route.indices[t, slot])
            xd = _dequant64(*quantize_blockwise(x[t : t + 1], act), act)
            gu = xd @ _dequant64(*quantize_blockwise(moe.experts.gate_up_proj[e].detach(), blk), blk).t()
            gate, up = gu.float().chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * up
            hd = _dequant64(*quantize_blockwise(h, act), act)
            y = hd @ _dequant64(*quantize_blockwise(moe.experts.down_proj[e].detach(), blk), blk).t()
            ref[t] += route.weights[t, slot].double() * y[0]
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)


def _fp8_bytes(rows: int, k: int) -> int:
    """An FP8 copy of [rows, k]: 1 byte per element and a float32 scale per 1x128 tile."""
    return rows * k + rows * -(-k // 128) * 4


def test_fp8_mlp_saves_one_fp8_input_and_the_gate_up_products() -> None:
    """Hand-counted bytes saved for the backward by an FP8 SwiGLU MLP under bf16 autocast: the input's
    FP8 copy once (gate_proj and up_proj share it) and gate and up in bf16; down_proj's input
    silu(gate) * up is recomputed from them in the backward."""
    n, h, i = 24, 256, 192
    torch.manual_seed(0)
    mlp = MLP(h, i)
    fp8 = FP8TrainingMLP.from_mlp(mlp)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(fp8, name, FP8TrainingLinear.from_linear(getattr(mlp, name)))
    x = torch.randn(n, h, requires_grad=True) * 1.0  # not a leaf, as in a model (autocast caches leaves' casts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, fp8_elements = saved_activation_bytes(lambda: fp8(x).float().sum().backward(retain_graph=True),
                                                   mlp.parameters())
        bf16, _ = saved_activation_bytes(lambda: mlp(x).float().sum().backward(retain_graph=True), mlp.parameters())
    assert got == _fp8_bytes(n, h) + 2 * n * i * 2
    assert fp8_elements == n * h
    # bf16: the input cast twice (autocast does not share activation casts), gate, up, silu(gate), product
    assert bf16 == 2 * n * h * 2 + 4 * n * i * 2


def test_fp8_experts_save_hand_counted_bytes() -> None:
    """Per routed slot: the FP8 copy of the expert's input, the bf16 gate/up product and the bf16
    expert output (for the gate weight's gradient); per slot also the float32 gate weight and two
    int64 indices. Nothing of the float32 [slots, H] that autograd's `index_add` would keep, nor of
    the SwiGLU output."""
    cfg = ModelConfig(**{**PRESETS["tiny-v3"], "hidden_size": 256, "moe_intermediate_size": 192,
                         "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1})
    torch.manual_seed(0)
    experts = Experts(cfg)
    experts.reset_parameters()
    fp8 = FP8TrainingExperts.from_experts(experts)
    n, h, i, k = 24, 256, 192, 2
    x = torch.randn(n, h, requires_grad=True)
    logits = torch.randn(n, 4, requires_grad=True)
    weights, indices = logits.softmax(-1).topk(k, dim=-1)
    counts = torch.bincount(indices.flatten(), minlength=4)
    from seekformer.model.moe import RouterOutput

    route = RouterOutput(indices, weights, None, counts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, fp8_elements = saved_activation_bytes(lambda: fp8(x, route).sum().backward(), experts.parameters())
    s = n * k
    assert fp8_elements == s * h
    assert got == _fp8_bytes(s, h) + s * 2 * i * 2 + s * h * 2 + s * 4 + 2 * s * 8


def test_memory_saving_pieces_give_the_values_and_gradients_of_the_plain_composition_bit_for_bit() -> None:
    """They change nothing numerically: `fp8_swiglu_linear_train` against `fp8_linear_train(F.silu(gate)
    * up)` left to autograd, and the FP8 experts against `Experts.forward` (the same FP8 products,
    weighted and summed by autograd)."""
    gen = torch.Generator().manual_seed(5)
    gate, up = (torch.randn(33, 200, generator=gen) for _ in range(2))
    weight, bias = torch.randn(150, 200, generator=gen) / 10, torch.randn(150, generator=gen)
    grad = torch.randn(33, 150, generator=gen).bfloat16()
    runs = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (gate, up, weight, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            g, u = (t * 1.0 for t in leaves[:2])  # bf16 products, as gate_proj/up_proj give
            g, u = g.bfloat16(), u.bfloat16()
            if fused:
                out = fp8_swiglu_linear_train(g, u, leaves[2], leaves[3])
            else:
                out = fp8_linear_train(torch.nn.functional.silu(g) * u, leaves[2], leaves[3])
        out.backward(grad)
        runs.append([out] + [t.grad for t in leaves])
    assert runs[0][0].dtype == torch.bfloat16
    assert all(torch.equal(p, q) for p, q in zip(*runs))

    model = _tiny_v3()
    moe = model.model.layers[1].mlp
    fp8 = FP8TrainingExperts.from_experts(moe.experts)
    runs = []
    for forward in (fp8.forward, lambda x, route: Experts.forward(fp8, x, route)):
        x = torch.randn(50, moe.experts.gate_up_proj.shape[2], generator=torch.Generator().manual_seed(1))
        x.requires_grad_()
        fp8.zero_grad(set_to_none=True)
        moe.gate.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = forward(x, moe.gate(x))
        out.pow(2).sum().backward()
        runs.append([out, x.grad, fp8.gate_up_proj.grad, fp8.down_proj.grad, moe.gate.weight.grad])
    assert all(torch.equal(p, q) for p, q in zip(*runs))


def test_fp8_input_copy_is_shared_only_while_the_tensor_is_unchanged() -> None:
    w = (torch.randn(64, 128) / 8).requires_grad_()
    x = torch.randn(16, 128)
    first = fp8_linear_train(x, w)  # its graph keeps x's FP8 copy alive
    x.mul_(3)  # in place: the cached FP8 copy of x is stale
    again = fp8_linear_train(x, w)
    torch.testing.assert_close(again, fp8_linear_train(x.clone(), w))
    torch.testing.assert_close(again, 3 * first, rtol=0.07, atol=1e-3)
    assert first.grad_fn is not None


def test_tiny_model_trains_under_fp8(data_dir, tmp_path, one_thread) -> None:
    cfg = tiny_run_config(data_dir, "run.steps=12", "run.log_every=4", "run.eval_every=0", "run.save_every=0",
                          "run.dtype=fp8", "optim.lr=3e-3")
    trainer = Trainer(cfg, tmp_path / "run", progress=False, echo=lambda _: None)
    assert any(isinstance(m, FP8TrainingExperts) for m in trainer.model.modules())
    trainer.train()
    losses = [loss for _, loss in step_losses(tmp_path / "run")]
    assert losses[-1] < losses[0] - 0.3
    for p in trainer.model.parameters():
        assert p.dtype == torch.float32


HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not HOPPER, reason="cuBLASLt's block-scaled FP8 kernels need a Hopper GPU")


@needs_hopper
@pytest.mark.parametrize("m,n,k,b_rows", [(33, 50, 100, 128), (130, 257, 300, 128), (5, 128, 512, 128),
                                          (512, 576, 2048, 128), (256, 2048, 7168, 128),
                                          (150, 70, 200, 1), (512, 256, 384, 1)])
def test_block_scaled_kernel_equals_float64_of_same_operands(m: int, n: int, k: int, b_rows: int) -> None:
    """cuBLASLt's kernel on the same quantised operands as the float64 reference: only summation
    rounding apart (bounded by 2^-12 of the sum of |products|), far below the FP8 quantisation error."""
    assert uses_block_scaled_kernel("cuda")
    gen = torch.Generator().manual_seed(m + n + k)
    a = torch.randn(m, k, generator=gen) * 5
    b = torch.randn(n, k, generator=gen) / 7
    a_q, a_s = quantize_blockwise(a, (1, 128))
    b_q, b_s = quantize_blockwise(b, (b_rows, 128))
    ad, bd = _dequant64(a_q, a_s, (1, 128)), _dequant64(b_q, b_s, (b_rows, 128))
    ref = ad @ bd.t()
    got = fp8_gemm(a_q.cuda(), a_s.cuda(), b_q.cuda(), b_s.cuda(), 1, b_rows)
    assert got.dtype == torch.float32 and got.shape == (m, n) and got.is_cuda
    err = (got.cpu().double() - ref).abs()
    assert (err <= 2**-12 * (ad.abs() @ bd.abs().t()) + 1e-30).all()
    assert (got.cpu().double() - a.double() @ b.double().t()).abs().max() > 30 * err.max()


@needs_hopper
def test_block_scaled_kernel_promotes_per_128_chunk() -> None:
    a = torch.cat((torch.full((1, 128), 1e4), torch.full((1, 128), 1e-4)), dim=1)
    b = torch.cat((torch.zeros(1, 128), torch.ones(1, 128)), dim=1)
    a_q, a_s = quantize_blockwise(a, (1, 128))
    b_q, b_s = quantize_blockwise(b, (128, 128))
    got = fp8_gemm(a_q.cuda(), a_s.cuda(), b_q.cuda(), b_s.cuda(), 1, 128)
    assert got.item() == pytest.approx(128e-4, rel=2**-4)


@needs_hopper
def test_fp8_linear_on_hopper_equals_the_emulation() -> None:
    """Forward and both gradients of the FP8 linear through cuBLASLt equal the CPU emulation's: the
    same quantised operands, so they differ only by the kernel's accumulation rounding, bounded by
    2^-12 of the sum of |products| (the kernel test above); 2^-11 of the unquantised operands' sum
    covers e4m3's rounding of each magnitude (< 2^-4) too."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 70, 256, generator=gen) * 2
    w = torch.randn(384, 256, generator=gen) / 10
    gy = torch.randn(3, 70, 384, generator=gen) / 3
    results = []
    for device in ("cpu", "cuda"):
        xd, wd = x.to(device, copy=True).requires_grad_(), w.to(device, copy=True).requires_grad_()
        y = fp8_linear_train(xd, wd)
        y.backward(gy.to(device))
        results.append([t.detach().cpu() for t in (y, xd.grad, wd.grad)])
    x2, gy2 = x.reshape(-1, 256).double(), gy.reshape(-1, 384).double()
    sums_of_abs_products = ((x2.abs() @ w.double().abs().t()).reshape(y.shape),
                            (gy2.abs() @ w.double().abs()).reshape(x.shape), gy2.abs().t() @ x2.abs())
    errors = [(cuda.double() - cpu.double()).abs() for cpu, cuda in zip(*results)]
    for err, sums in zip(errors, sums_of_abs_products):
        assert (err <= 2**-11 * sums).all(), (err / sums).max()
    exact = (x2 @ w.double().t()).reshape(y.shape)  # FP8's own error dwarfs the kernel's rounding
    assert (results[0][0].double() - exact).abs().max() > 10 * errors[0].max()


@needs_hopper
def test_fp8_training_on_hopper_follows_the_emulated_run(data_dir, tmp_path) -> None:
    """The tiny V3 run under run.dtype=fp8 on the GPU (cuBLASLt GEMMs) and on the CPU (emulation):
    the same first loss up to summation order, and the same learning curve within 2%."""
    curves = {}
    for device in ("cpu", "cuda"):
        cfg = tiny_run_config(data_dir, "run.steps=12", "run.log_every=1", "run.eval_every=0", "run.save_every=0",
                              "run.dtype=fp8", "optim.lr=3e-3", f"run.device='{device}'")
        trainer = Trainer(cfg, tmp_path / device, progress=False, echo=lambda _: None)
        trainer.train()
        curves[device] = [loss for _, loss in step_losses(tmp_path / device)]
    cpu, cuda = curves["cpu"], curves["cuda"]
    assert cuda[0] == pytest.approx(cpu[0], rel=2e-3)
    assert cuda[-1] == pytest.approx(cpu[-1], rel=2e-2)
    assert cuda[-1] < cuda[0] - 0.3
