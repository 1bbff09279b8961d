"""Weights packed for oneDNN's bf16 decode products (`pack_for_decode`): the same outputs and
samples as the plain products, never used once stale or where a gradient is needed."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seekformer import ModelConfig, Transformer
from seekformer.inference import generate
from seekformer.model import bf16_rows
from seekformer.model.packed_weights import (
    fresh_packs,
    pack_for_decode,
    packing_available,
    refresh_and_pack,
    release_packs,
)

pytestmark = pytest.mark.skipif(not packing_available("cpu", torch.bfloat16),
                                reason="this CPU/PyTorch build has no oneDNN bf16 products")


def _model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny-v3"))
    model.init_weights()
    return model.to(torch.bfloat16).eval()


@pytest.fixture(params=["bf16_rows", "onednn"])
def kernel(request, monkeypatch):
    """Which packs `pack_for_decode` makes: `bf16_rows`' layout (where its kernel runs here) or oneDNN's."""
    if request.param == "bf16_rows" and not bf16_rows.available():
        pytest.skip("the bf16 few-row kernel does not run here (no C compiler or no AVX512-BF16)")
    if request.param == "onednn":
        monkeypatch.setattr(bf16_rows, "available", lambda: False)
    return request.param


def test_packed_model_decodes_as_the_plain_one(one_thread, monkeypatch, kernel):
    from seekformer.model import expert_kernels, packed_weights

    calls = {"linear": 0, "experts": 0}

    def spy(kind, original):
        return lambda *a: calls.__setitem__(kind, calls[kind] + 1) or original(*a)

    monkeypatch.setattr(packed_weights, "packed_linear", spy("linear", packed_weights.packed_linear))
    monkeypatch.setattr(expert_kernels, "packed_linear", spy("experts", expert_kernels.packed_linear))
    monkeypatch.setattr(bf16_rows, "grouped_rows", spy("experts", bf16_rows.grouped_rows))
    plain = _model()
    packed = copy.deepcopy(plain)
    assert pack_for_decode(packed) > 0
    with torch.no_grad():
        assert isinstance(fresh_packs(packed.lm_head.weight), torch.Tensor) == (kernel == "bf16_rows")
    ids = torch.randint(0, plain.config.vocab_size, (6, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).float(), plain(ids).float(), atol=1e-2, rtol=1e-2)
    rows = ids.tolist()
    ours = generate(packed, rows, max_new_tokens=12, temperature=1.0, seed=3, stop_tokens=[])
    theirs = generate(plain, rows, max_new_tokens=12, temperature=1.0, seed=3, stop_tokens=[], pack_weights=False)
    assert ours.tokens == theirs.tokens
    assert calls["linear"] > 0 and calls["experts"] > 0  # both the linear layers and the experts read packs
    release_packs(packed)
    assert all(type(m) is torch.nn.Linear for m in packed.modules() if isinstance(m, torch.nn.Linear))


def test_stale_or_differentiable_products_do_not_use_the_packs(kernel):
    model = _model().requires_grad_(False)
    pack_for_decode(model)
    linear = model.lm_head
    assert fresh_packs(linear.weight) is not None
    x = torch.randn(3, linear.in_features).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.mul_(2)  # an in-place update (optimizer step, weight refresh) makes the packs stale
        assert fresh_packs(linear.weight) is None
        torch.testing.assert_close(linear(x), x @ linear.weight.t())
        experts = next(m for m in model.modules() if type(m).__name__ == "Experts")
        experts.gate_up_proj.add_(1)
        assert fresh_packs(experts.gate_up_proj) is None
    pack_for_decode(model)
    assert fresh_packs(linear.weight) is not None
    with torch.no_grad():
        torch.testing.assert_close(linear(x), x @ linear.weight.t())
    # with autograd the plain product runs, and gradients flow
    model.requires_grad_(True)
    assert fresh_packs(linear.weight) is None
    xg = x.clone().requires_grad_()
    linear(xg).float().sum().backward()
    assert xg.grad is not None and linear.weight.grad is not None


def test_refresh_and_pack_equals_copying_then_packing(kernel):
    """GRPO's refresh of its bf16 rollout copy from the float32 policy: the same weights, buffers and
    packs as `copy_` of every state entry then `pack_for_decode`, over the previous packs' memory."""
    policy = _model().float()
    rollout = copy.deepcopy(policy).to(torch.bfloat16).requires_grad_(False)
    refresh_and_pack(rollout, policy.state_dict())  # the first refresh: nothing packed yet
    experts = next(m for m in rollout.modules() if type(m).__name__ == "Experts")
    with torch.no_grad():
        pointer = fresh_packs(experts.gate_up_proj)
        pointer = pointer.data_ptr() if isinstance(pointer, torch.Tensor) else None
        for value in policy.state_dict().values():  # an optimizer step, and values between bf16 ones
            value.add_(torch.randn(value.shape, generator=torch.Generator().manual_seed(value.numel())) * 1e-3)
    refresh_and_pack(rollout, policy.state_dict())
    reference = copy.deepcopy(policy).to(torch.bfloat16).requires_grad_(False)
    pack_for_decode(reference)
    ours, theirs = rollout.state_dict(), reference.state_dict()
    assert all(torch.equal(ours[k].view(torch.uint8), theirs[k].view(torch.uint8)) for k in theirs)
    weights = [(m.weight, r.weight) for m, r in zip(rollout.modules(), reference.modules())
               if isinstance(m, torch.nn.Linear)]
    weights += [(getattr(experts, n), getattr(next(m for m in reference.modules() if type(m).__name__ == "Experts"), n))
                for n in ("gate_up_proj", "down_proj")]
    with torch.no_grad():
        for mine, other in weights:
            a, b = fresh_packs(mine), fresh_packs(other)
            assert a is not None and b is not None
            if isinstance(a, torch.Tensor):
                assert torch.equal(a.view(torch.int16), b.view(torch.int16))
            else:
                assert all(torch.equal(x.to_dense() if x.is_mkldnn else x, y.to_dense() if y.is_mkldnn else y)
                           for x, y in zip(a, b))
        if pointer is not None:
            assert fresh_packs(experts.gate_up_proj).data_ptr() == pointer  # no fresh memory


def test_generate_packs_a_bf16_model_once_and_only_when_the_memory_allows(monkeypatch, one_thread):
    """`generate` packs a bf16 CPU model on its first call, same tokens as unpacked, and keeps the packs
    for the next call (no repacking); not with pack_weights=False, not when the packs would take more
    than a quarter of the available memory (unless pack_weights=True), never a float32 model."""
    from seekformer.model import packed_weights

    packs_made = []
    pack = packed_weights.pack_for_decode
    monkeypatch.setattr(packed_weights, "pack_for_decode", lambda m: packs_made.append(1) or pack(m))
    model, plain = _model(), _model().requires_grad_(False)  # packs serve no-grad products of either
    rows = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2)).tolist()
    first = generate(model, rows, max_new_tokens=6, temperature=1.0, seed=1, stop_tokens=[])
    with torch.no_grad():
        assert fresh_packs(model.lm_head.weight) is not None and packs_made == [1]
    again = generate(model, rows, max_new_tokens=6, temperature=1.0, seed=1, stop_tokens=[])
    unpacked = generate(plain, rows, max_new_tokens=6, temperature=1.0, seed=1, stop_tokens=[], pack_weights=False)
    assert packs_made == [1] and fresh_packs(plain.lm_head.weight) is None
    assert first.tokens == again.tokens == unpacked.tokens

    monkeypatch.setattr(packed_weights, "_available_memory", lambda: 3 * plain.lm_head.weight.numel())
    generate(plain, rows, max_new_tokens=2, stop_tokens=[])
    assert fresh_packs(plain.lm_head.weight) is None  # too little memory: left alone
    generate(plain, rows, max_new_tokens=2, stop_tokens=[], pack_weights=True)
    assert fresh_packs(plain.lm_head.weight) is not None
    fp32 = Transformer(ModelConfig.preset("tiny-v3")).eval().requires_grad_(False)
    generate(fp32, rows, max_new_tokens=2, stop_tokens=[])
    assert fresh_packs(fp32.lm_head.weight) is None
    with pytest.raises(ValueError, match="pack_weights"):
        generate(fp32, rows, max_new_tokens=2, pack_weights="yes")


def test_generate_after_an_optimizer_step_uses_the_new_weights():
    """Fused AdamW does not bump its parameters' version counters, which the decode caches (packs, MLA's
    absorbed matrices) key on: after a step of `build_optimizer`'s AdamW, `generate` gives the tokens
    of a fresh copy of the updated model (it gave the previous weights' tokens)."""
    from seekformer.training.optim import build_optimizer
    from seekformer.training.run_config import OptimSection

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        model = Transformer(ModelConfig.preset("tiny-v3")).to(dtype)
        optimizer = build_optimizer(model, OptimSection(lr=1e-2))
        prompt = [[5, 6, 7, 8, 9]]
        generate(model, prompt, max_new_tokens=4, attention_path="absorbed", pack_weights=True)  # fills the caches
        model.hidden_states(torch.randint(0, 1000, (2, 16))).float().pow(2).mean().backward()
        optimizer.step()
        fresh = copy.deepcopy(model)
        for path in ("absorbed", "naive"):
            tokens = generate(model, prompt, max_new_tokens=8, attention_path=path, pack_weights=True).tokens
            assert tokens == generate(fresh, prompt, max_new_tokens=8, attention_path=path).tokens, (dtype, path)


def test_release_packs_drops_the_attention_copies_and_sees_data_writes():
    """`release_packs` also forgets MLA's absorbed copies of `kv_b_proj` (they stayed: a `.data` write,
    which no version counter sees, kept decoding with the old weights even after it), and
    `pack_weights=False` keeps none."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny-v3")).to(torch.bfloat16).eval()
    prompt = [[5, 6, 7, 8, 9]]
    attention = [m for m in model.modules() if hasattr(m, "drop_weight_copies")]
    generate(model, prompt, max_new_tokens=4, attention_path="absorbed", pack_weights=False)
    assert all(m._absorbed_packs is None for m in attention)
    generate(model, prompt, max_new_tokens=4, attention_path="absorbed", pack_weights=True)
    with torch.no_grad():
        for p in model.parameters():
            p.data.copy_(p.data + 0.05 * torch.randn_like(p.data))
    release_packs(model)
    assert all(m._absorbed_packs is None and m._absorbed_weights is None for m in attention)
    fresh = copy.deepcopy(model)
    for path in ("absorbed", "naive"):
        assert (generate(model, prompt, max_new_tokens=8, attention_path=path).tokens
                == generate(fresh, prompt, max_new_tokens=8, attention_path=path).tokens)


def test_a_packed_linear_with_a_bias_rounds_once_like_f_linear():
    """The few-row kernel rounds to bf16; a bias added after it would round twice. A biased layer keeps
    `F.linear`'s values."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 64, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        layer.bias.mul_(50)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    expected = F.linear(x, layer.weight, layer.bias)
    pack_for_decode(layer)
    with torch.inference_mode():
        assert torch.equal(layer(x), expected)
