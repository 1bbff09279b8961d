"""DeepSeek-V3 block-wise FP8: hub-format (de)quantization, activation tiles, FP8 linear, state dicts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seekformer.quant import (
    FP8Linear,
    default_fp8_selector,
    dequantize_activation,
    dequantize_blockwise,
    dequantize_state_dict_fp8,
    fp8_linear,
    hub_quantization_config,
    parse_quantization_config,
    quantize_activation,
    quantize_blockwise,
    quantize_state_dict_fp8,
)

E4M3 = torch.float8_e4m3fn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_fp8(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Random e4m3 codes spread over the whole finite range (normals and subnormals)."""
    g = _gen(seed)
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return (sign * torch.exp2(torch.rand(shape, generator=g) * 18 - 9)).clamp(-448, 448).to(E4M3)


def _loop_dequant_f64(w8: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Independent oracle: explicit loop over blocks in float64."""
    out = torch.empty(w8.shape, dtype=torch.float64)
    w = w8.to(torch.float64)
    for bi in range(math.ceil(w8.shape[0] / block[0])):
        for bj in range(math.ceil(w8.shape[1] / block[1])):
            rs = slice(bi * block[0], (bi + 1) * block[0])
            cs = slice(bj * block[1], (bj + 1) * block[1])
            out[rs, cs] = w[rs, cs] * float(s[bi, bj])
    return out


# --------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, block",
    [((256, 384), (128, 128)), ((300, 200), (128, 128)), ((1, 129), (128, 128)), ((70, 45), (32, 16))],
)
def test_dequantize_matches_loop_oracle(shape: tuple[int, int], block: tuple[int, int]) -> None:
    w8 = _random_fp8(shape, seed=1)
    grid = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    s = torch.rand(grid, generator=_gen(2)) * 1e-2 + 1e-4
    ref = _loop_dequant_f64(w8, s, block)
    # float64 output: the product of an e4m3 code and a float32 scale is exact in float64
    assert torch.equal(dequantize_blockwise(w8, s, block, torch.float64), ref)
    # float32 output is the exact product rounded once
    assert torch.equal(dequantize_blockwise(w8, s, block, torch.float32), ref.to(torch.float32))
    # bf16 output: formed in float32, cast once (as the reference kernels do)
    out16 = dequantize_blockwise(w8, s, block, torch.bfloat16)
    assert out16.dtype == torch.bfloat16 and out16.shape == shape and out16.is_contiguous()
    assert torch.equal(out16, ref.to(torch.float32).to(torch.bfloat16))


def test_dequantize_default_block_and_list_block_size() -> None:
    w8 = _random_fp8((300, 200), seed=3)
    s = torch.rand(3, 2, generator=_gen(4))
    ref = _loop_dequant_f64(w8, s, (128, 128)).to(torch.float32)
    assert torch.equal(dequantize_blockwise(w8, s), ref)
    assert torch.equal(dequantize_blockwise(w8, s, [128, 128]), ref)


def test_dequantize_in_row_bands(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large weights are processed in bands of block rows; the result must not depend on banding."""
    import seekformer.quant.fp8 as fp8

    w8 = _random_fp8((300, 200), seed=5)
    s = torch.rand(3, 2, generator=_gen(6))
    whole = dequantize_blockwise(w8, s, dtype=torch.bfloat16)
    monkeypatch.setattr(fp8, "_BAND_ELEMENTS", 1)  # one block row per band
    assert fp8._band_rows(200, 128) == 128
    assert torch.equal(dequantize_blockwise(w8, s, dtype=torch.bfloat16), whole)
    w = torch.randn(300, 200, generator=_gen(7))
    q_band, s_band = quantize_blockwise(w)
    monkeypatch.setattr(fp8, "_BAND_ELEMENTS", 1 << 24)
    q_whole, s_whole = quantize_blockwise(w)
    assert torch.equal(q_band.view(torch.uint8), q_whole.view(torch.uint8)) and torch.equal(s_band, s_whole)


@pytest.mark.parametrize(
    "shape, block", [((256, 256), (128, 128)), ((300, 200), (128, 128)), ((70, 45), (32, 16))]
)
def test_quantize_round_trip_and_block_max(shape: tuple[int, int], block: tuple[int, int]) -> None:
    g = _gen(10)
    # blocks with very different magnitudes, as in real weights
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[1]).unsqueeze(0)
    q, s = quantize_blockwise(w, block)
    grid = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    assert q.dtype == E4M3 and q.shape == shape
    assert s.dtype == torch.float32 and tuple(s.shape) == grid

    w64 = w.double()
    for bi in range(grid[0]):
        for bj in range(grid[1]):
            blk = w64[bi * block[0] : (bi + 1) * block[0], bj * block[1] : (bj + 1) * block[1]]
            qb = q[bi * block[0] : (bi + 1) * block[0], bj * block[1] : (bj + 1) * block[1]].double()
            amax = blk.abs().max()
            # scale is amax / 448 (float32), and the block's max maps onto 448
            assert s[bi, bj].item() == pytest.approx(amax.item() / 448, rel=1e-6)
            pre_cast = (blk / float(s[bi, bj])).abs().max().item()
            assert pre_cast == pytest.approx(448.0, rel=2**-22)
            assert qb.abs().max().item() == 448.0

    deq = dequantize_blockwise(q, s, block, torch.float64)
    # e4m3 has 3 mantissa bits: relative error <= 2^-4 for values in the normal range (>= 2^-6 in the
    # scaled domain); below that (subnormals) the absolute error is <= 2^-10 in the scaled domain
    scale_full = (
        s.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: shape[0], : shape[1]].double()
    )
    normal = w64.abs() >= scale_full * 2**-6
    rel = ((deq - w64).abs() / w64.abs())[normal]
    assert normal.float().mean() > 0.9
    assert rel.max().item() <= 2**-4 + 1e-6
    sub_err = ((deq - w64).abs() / scale_full)[~normal]
    assert sub_err.numel() == 0 or sub_err.max().item() <= 2**-10 + 1e-9


def test_quantize_zero_block_and_dtypes() -> None:
    w = torch.randn(256, 256, generator=_gen(11), dtype=torch.bfloat16)
    w[:128, 128:] = 0
    q, s = quantize_blockwise(w)
    assert s[0, 1].item() == 1.0  # guarded: no 0/0
    assert torch.isfinite(q.float()).all()
    assert (q[:128, 128:].float() == 0).all()
    deq = dequantize_blockwise(q, s, dtype=torch.bfloat16)
    assert (deq[:128, 128:] == 0).all()
    # input is not modified and float32 inputs work too
    w32 = torch.randn(130, 7, generator=_gen(12))
    before = w32.clone()
    quantize_blockwise(w32)
    assert torch.equal(w32, before)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_blockwise(torch.tensor([[1.0, float("inf")]]))


# --------------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------------


def test_activation_tile_scales_by_hand() -> None:
    x = torch.randn(2, 3, 300, generator=_gen(20)) * 5
    x[0, 1, 128:256] = 0  # an all-zero tile: amax clamps to 1e-4
    q, sc = quantize_activation(x)
    assert q.dtype == E4M3 and q.shape == x.shape
    assert sc.dtype == torch.float32 and sc.shape == (2, 3, 3)
    for idx in [(0, 0), (0, 1), (1, 2)]:
        for t, (a, b) in enumerate([(0, 128), (128, 256), (256, 300)]):
            amax = max(x[idx][a:b].abs().max().item(), 1e-4)
            assert sc[idx][t].item() == pytest.approx(amax / 448, rel=1e-6)
            if amax > 1e-4:
                assert q[idx][a:b].float().abs().max().item() == 448.0
    assert sc[0, 1, 1].item() == pytest.approx(1e-4 / 448, rel=1e-6)
    assert (q[0, 1, 128:256].float() == 0).all()

    deq = dequantize_activation(q, sc)
    assert deq.shape == x.shape and deq.dtype == torch.float32
    tile_scale = sc.repeat_interleave(128, -1)[..., :300]
    normal = x.abs() >= tile_scale * 2**-6
    rel = ((deq - x).abs() / x.abs())[normal]
    assert rel.max().item() <= 2**-4 + 1e-6
    # non-default tile
    q2, sc2 = quantize_activation(x, tile=64)
    assert sc2.shape == (2, 3, 5)
    assert dequantize_activation(q2, sc2, tile=64).shape == x.shape


def test_activation_errors() -> None:
    q, sc = quantize_activation(torch.randn(4, 256))
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 256\).*expected \(4, 2\)"):
        dequantize_activation(q, torch.ones(4, 3))
    with pytest.raises(ValueError, match="float8"):
        dequantize_activation(q.float(), sc)
    with pytest.raises(ValueError, match="float8"):
        quantize_activation(q)


# --------------------------------------------------------------------------------------------------
# FP8 linear
# --------------------------------------------------------------------------------------------------


def test_fp8_linear_vs_fp32_matmul() -> None:
    g = _gen(30)
    x = torch.randn(4, 16, 320, generator=g)
    w = torch.randn(200, 320, generator=g) * 0.05
    b = torch.randn(200, generator=g)
    q, s = quantize_blockwise(w)
    y = fp8_linear(x, q, s, b)
    ref = x.double() @ w.double().t()
    rel = ((y.double() - b.double() - ref).norm() / ref.norm()).item()
    # two independent e4m3 roundings of Gaussian data (~2.6% rms each) -> ~3.7% on the product
    print(f"fp8_linear relative Frobenius error vs float64: {rel:.4f}")
    assert rel < 0.05
    # it is exactly the simulation: tile-dequantized x times block-dequantized W, float32 accumulation
    xq, xs = quantize_activation(x)
    sim = dequantize_activation(xq, xs) @ dequantize_blockwise(q, s).t() + b
    assert torch.allclose(y, sim, rtol=1e-6, atol=1e-5)
    # output dtype follows x
    assert fp8_linear(x.bfloat16(), q, s).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="last dim 100"):
        fp8_linear(torch.randn(2, 100), q, s)


def test_fp8_linear_straight_through_gradient() -> None:
    lin = nn.Linear(256, 130, bias=False)
    m = FP8Linear.from_linear(lin)
    x = torch.randn(3, 256, generator=_gen(31), requires_grad=True)
    m(x).sum().backward()
    expected = torch.ones(3, 130) @ m.dequantized_weight()
    assert torch.allclose(x.grad, expected, rtol=1e-5, atol=1e-5)


def test_fp8linear_state_dict_and_from_linear() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(300, 200, bias=False)
    m = FP8Linear.from_linear(lin)
    sd = m.state_dict()
    assert list(sd) == ["weight", "weight_scale_inv"]
    assert sd["weight"].dtype == E4M3 and sd["weight"].shape == (200, 300)
    assert sd["weight_scale_inv"].dtype == torch.float32 and sd["weight_scale_inv"].shape == (2, 3)
    # round trip: dequantized weight is close to the original; forward is close to the float linear
    w = lin.weight.detach()
    assert ((m.dequantized_weight() - w).norm() / w.norm()).item() < 0.04
    assert m.dequantized_weight(torch.bfloat16).dtype == torch.bfloat16
    x = torch.randn(5, 300, generator=_gen(40))
    assert ((m(x) - lin(x)).norm() / lin(x).norm()).item() < 0.05
    # load into a fresh module, hub-style keys
    m2 = FP8Linear(300, 200)
    m2.load_state_dict(sd)
    assert torch.equal(m2(x), m(x))
    # with bias
    lb = nn.Linear(300, 200, bias=True)
    mb = FP8Linear.from_linear(lb)
    assert set(mb.state_dict()) == {"weight", "weight_scale_inv", "bias"}
    assert torch.equal(mb.bias.detach(), lb.bias.detach())
    # a dense weight is refused with a clear message
    with pytest.raises(RuntimeError, match="expects a float8 weight"):
        FP8Linear(300, 200).load_state_dict({"weight": w, "weight_scale_inv": sd["weight_scale_inv"]})


def test_fp8linear_keeps_storage_dtypes_on_module_casts() -> None:
    m = FP8Linear.from_linear(nn.Linear(256, 256, bias=True))
    w0, s0 = m.weight.clone(), m.weight_scale_inv.clone()
    model = nn.Sequential(m).to(torch.bfloat16)
    assert m.weight.dtype == E4M3 and m.weight_scale_inv.dtype == torch.float32
    assert torch.equal(m.weight.view(torch.uint8), w0.view(torch.uint8)) and torch.equal(
        m.weight_scale_inv, s0
    )
    assert m.bias.dtype == torch.bfloat16
    model.float().half()
    assert m.weight.dtype == E4M3 and torch.equal(m.weight_scale_inv, s0)
    assert "block_size=(128, 128)" in repr(m)


# --------------------------------------------------------------------------------------------------
# state dicts and config
# --------------------------------------------------------------------------------------------------

_QUANTIZED = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.gate_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.3.self_attn.q_a_proj.weight",
    "model.layers.3.self_attn.q_b_proj.weight",
    "model.layers.3.self_attn.kv_a_proj_with_mqa.weight",
    "model.layers.3.self_attn.kv_b_proj.weight",
    "model.layers.3.mlp.experts.0.gate_proj.weight",
    "model.layers.3.mlp.experts.17.down_proj.weight",
    "model.layers.3.mlp.shared_experts.up_proj.weight",
    "model.layers.61.self_attn.o_proj.weight",  # the MTP block's own attention/MLP are quantized
    "model.layers.61.mlp.experts.2.up_proj.weight",
]
_KEPT = [
    "model.embed_tokens.weight",
    "lm_head.weight",
    "model.norm.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.3.self_attn.q_a_layernorm.weight",
    "model.layers.3.self_attn.kv_a_layernorm.weight",
    "model.layers.3.mlp.gate.weight",
    "model.layers.3.mlp.gate.e_score_correction_bias",
    "model.layers.61.eh_proj.weight",
    "model.layers.61.enorm.weight",
    "model.layers.61.hnorm.weight",
    "model.layers.61.shared_head.head.weight",
    "model.layers.61.shared_head.norm.weight",
    "model.layers.61.embed_tokens.weight",
    "model.layers.0.self_attn.o_proj.bias",
]


def _hub_like_dict() -> dict[str, torch.Tensor]:
    g = _gen(50)
    sd: dict[str, torch.Tensor] = {}
    for k in _QUANTIZED + _KEPT:
        one_d = "norm" in k or k.endswith(("bias", "e_score_correction_bias"))
        sd[k] = torch.randn((200,) if one_d else (200, 160), generator=g).to(torch.bfloat16)
    return sd


def test_default_selector() -> None:
    assert [k for k in _QUANTIZED if not default_fp8_selector(k)] == []
    assert [k for k in _KEPT if default_fp8_selector(k)] == []


def test_quantize_state_dict_selects_exact_keys() -> None:
    sd = _hub_like_dict()
    out = quantize_state_dict_fp8(sd)
    fp8_keys = sorted(k for k, v in out.items() if v.dtype == E4M3)
    assert fp8_keys == sorted(_QUANTIZED)
    assert sorted(k for k in out if k.endswith("weight_scale_inv")) == sorted(
        k + "_scale_inv" for k in _QUANTIZED
    )
    for k in _QUANTIZED:
        assert out[k + "_scale_inv"].dtype == torch.float32 and out[k + "_scale_inv"].shape == (2, 2)
        assert list(out).index(k + "_scale_inv") == list(out).index(k) + 1
    for k in _KEPT:
        assert out[k] is sd[k]
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16  # input untouched
    # idempotent, and the inverse restores every key with the original dtype
    again = quantize_state_dict_fp8(out)
    assert list(again) == list(out) and all(again[k] is out[k] for k in out)
    back = dequantize_state_dict_fp8(out, dtype=torch.bfloat16)
    assert list(back) == list(sd)
    for k in _QUANTIZED:
        err = ((back[k].float() - sd[k].float()).norm() / sd[k].float().norm()).item()
        assert back[k].dtype == torch.bfloat16 and err < 0.04
    # custom selector and block size
    only_q = quantize_state_dict_fp8(sd, lambda k: k.endswith("q_proj.weight"), block_size=(64, 64))
    assert [k for k, v in only_q.items() if v.dtype == E4M3] == ["model.layers.0.self_attn.q_proj.weight"]
    assert only_q["model.layers.0.self_attn.q_proj.weight_scale_inv"].shape == (4, 3)


def test_state_dict_errors() -> None:
    with pytest.raises(ValueError, match=r"model.norm.weight.*\(200,\)"):
        quantize_state_dict_fp8({"model.norm.weight": torch.ones(200)}, lambda k: True)
    w8, s = quantize_blockwise(torch.randn(10, 10))
    with pytest.raises(ValueError, match="a.weight_scale_inv is missing"):
        dequantize_state_dict_fp8({"a.weight": w8})
    with pytest.raises(ValueError, match="no matching b.weight"):
        dequantize_state_dict_fp8({"b.weight_scale_inv": s})


def test_quantization_config() -> None:
    cfg = hub_quantization_config()
    assert cfg == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    assert parse_quantization_config(cfg) == (128, 128)
    assert parse_quantization_config(None) is None
    with pytest.raises(ValueError, match="quant_method"):
        parse_quantization_config({"quant_method": "gptq"})
    # one validator with config.json's: a missing block size is transformers' default, null is per-tensor FP8
    assert parse_quantization_config({"quant_method": "fp8", "fmt": "e4m3"}) == (128, 128)
    with pytest.raises(ValueError, match="weight_block_size must be two positive integers, got None"):
        parse_quantization_config({"quant_method": "fp8", "weight_block_size": None})
    with pytest.raises(ValueError, match="fmt 'e5m2' is not supported"):
        parse_quantization_config({"quant_method": "fp8", "fmt": "e5m2"})


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


def test_dequantize_errors_name_shapes() -> None:
    w8, s = quantize_blockwise(torch.randn(300, 200))
    with pytest.raises(ValueError, match=r"scale_inv shape \(2, 2\).*\(300, 200\).*expected \(3, 2\)"):
        dequantize_blockwise(w8, torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"float8.*torch.bfloat16.*\(300, 200\)"):
        dequantize_blockwise(w8.to(torch.bfloat16), s)
    with pytest.raises(ValueError, match=r"expected \(5, 13\)"):
        dequantize_blockwise(w8, s, block_size=(64, 16))
    with pytest.raises(ValueError, match="block_size"):
        dequantize_blockwise(w8, s, block_size=(0, 128))
    with pytest.raises(ValueError, match=r"2-D float.*\(4, 5, 6\)"):
        quantize_blockwise(torch.randn(4, 5, 6))
