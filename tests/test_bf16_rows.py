"""The few-row bf16 kernel (`model/bf16_rows.py`): products against float64, its packing against
torch's strided copy, in-place repacking, and the decode paths that use it."""

import pytest
import torch

from seekformer.model import bf16_rows
from seekformer.model.packed_weights import fresh_packs, pack_for_decode

pytestmark = pytest.mark.skipif(not bf16_rows.available(),
                                reason="the bf16 few-row kernel does not run here (no C compiler or no AVX512-BF16)")


def _bf16(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _assert_rounded_product(out: torch.Tensor, exact: torch.Tensor) -> None:
    """out (bf16) is the float64 product rounded to bf16, up to float32 accumulation: within one bf16
    rounding step of it (relative 2^-8) plus a float32-sized absolute slack."""
    assert out.dtype == torch.bfloat16
    error = (out.double() - exact).abs()
    assert bool((error <= exact.abs() * 2 ** -8 + 1e-5).all()), float(error.max())


@pytest.mark.parametrize("threads", [1, 2])
def test_grouped_rows_equal_each_groups_product(threads):
    # 6 groups: empty ones, 1 row, the 6-row register block and its tails; N = 80 is one 64-output item
    # plus a 16-output tail; K = 6 and K = 96 (short and longer reductions)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for K in (6, 96):
            counts = torch.tensor([0, 1, 6, 0, 13, 4])
            weights = _bf16(6, 80, K, seed=1)
            x = _bf16(int(counts.sum()), K, seed=2)
            out = bf16_rows.grouped_rows(x, counts, bf16_rows.pack(weights))
            exact = torch.cat([rows.double() @ weights[g].double().t()
                               for g, rows in enumerate(x.split(counts.tolist()))])
            _assert_rounded_product(out, exact)
    finally:
        torch.set_num_threads(old)


def test_rows_of_any_leading_shape_equal_the_product():
    weight, x = _bf16(48, 32, seed=3), _bf16(2, 5, 32, seed=4)
    out = bf16_rows.rows(x, bf16_rows.pack(weight))
    assert out.shape == (2, 5, 48)
    _assert_rounded_product(out, x.double() @ weight.double().t())
    assert bf16_rows.rows(x[:, :0], bf16_rows.pack(weight)).shape == (2, 0, 48)


def _packed_by_hand(weight: torch.Tensor) -> torch.Tensor:
    """The kernel's layout written out element by element: per group of 64 outputs (fewer in the last),
    per pair of inputs p, the group's blocks of 16 outputs side by side, each output's pair (2p, 2p+1)."""
    N, K = weight.shape
    flat = []
    for start in range(0, N, 64):
        outputs = range(start, min(start + 64, N))
        for p in range(K // 2):
            for n in outputs:
                flat += [weight[n, 2 * p], weight[n, 2 * p + 1]]
    return torch.stack(flat)


def test_pack_writes_in_place_in_the_kernels_layout():
    weight = _bf16(2, 80, 10, seed=5)  # N = 80: one group of 4 blocks and one of 1
    packed = bf16_rows.pack(weight)
    assert packed.shape == bf16_rows.packed_shape(weight) == (2, 5, 5, 16, 2)
    for m in range(2):
        assert torch.equal(packed[m].flatten(), _packed_by_hand(weight[m]))
    assert torch.equal(bf16_rows.pack(weight.float()), packed)  # float32 weights: exact bf16 values
    again = bf16_rows.pack(weight * 2, out=packed)
    assert again.data_ptr() == packed.data_ptr()
    assert torch.equal(again[1].flatten(), _packed_by_hand(weight[1] * 2))
    long = _bf16(48, 1030, seed=10)  # 3 blocks, and 515 pairs of inputs: the packing's 256-pair chunks
    assert torch.equal(bf16_rows.pack(long).flatten(), _packed_by_hand(long))
    with pytest.raises(ValueError, match="cannot hold"):
        bf16_rows.pack(weight[:, :16], out=packed)
    with pytest.raises(ValueError, match="do not match"):
        bf16_rows.grouped_rows(_bf16(4, 8, seed=6), torch.tensor([1, 1, 2]), packed)


@pytest.mark.parametrize("threads", [1, 2])
def test_pack_float_writes_the_bf16_copy_and_its_packs_in_one_pass(threads):
    """`pack_float` = `plain.copy_(weight)` then `pack(plain)`, byte for byte: round to nearest even
    (ties both ways), subnormals kept, infinities, NaN as PyTorch's copy writes it."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(2, 80, 10), (48, 1030), (3, 64, 64)]:  # a 16-output tail group; 515 pairs; whole tiles
            weight = torch.randn(*shape, generator=torch.Generator().manual_seed(11)) * 0.05
            flat = weight.view(-1)
            flat[:9] = torch.tensor([float("nan"), 1e-40, -3e-39, float("inf"), -float("inf"), 3.3895e38, 0.0, -0.0,
                                     1.0 + 2 ** -8])  # the last a tie rounded to even
            flat[9] = torch.tensor(1.0 + 3 * 2 ** -8)  # a tie rounded up
            plain = torch.empty(shape, dtype=torch.bfloat16)
            packed = torch.empty(bf16_rows.packed_shape(weight), dtype=torch.bfloat16)
            version = plain._version
            bf16_rows.pack_float(weight, plain, packed)
            expected = torch.empty(shape, dtype=torch.bfloat16).copy_(weight)
            assert torch.equal(plain.view(torch.int16), expected.view(torch.int16))
            assert plain._version > version  # written through its pointer, still seen as modified
            matrices = packed.view(-1, *bf16_rows.packed_shape(weight)[-4:])
            for m, matrix in enumerate(expected.view(-1, *shape[-2:])):
                assert torch.equal(matrices[m].flatten().view(torch.int16), _packed_by_hand(matrix).view(torch.int16))
    finally:
        torch.set_num_threads(old)
    with pytest.raises(ValueError, match="do not match"):
        bf16_rows.pack_float(weight.double(), plain, packed)
    with pytest.raises(ValueError, match="do not match"):
        bf16_rows.pack_float(weight, plain[:1], packed)


def test_repacking_a_refreshed_model_reuses_the_pack_memory():
    """GRPO refreshes its bf16 rollout copy in place and packs it again before every rollout: the
    packs are rewritten over their memory and follow the new weights."""
    from seekformer import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny-v3")).to(torch.bfloat16).eval().requires_grad_(False)
    experts = next(m for m in model.modules() if type(m).__name__ == "Experts")
    pack_for_decode(model)
    before = fresh_packs(experts.gate_up_proj)
    assert isinstance(before, torch.Tensor)
    pointer = before.data_ptr()
    experts.gate_up_proj.mul_(-1)
    assert fresh_packs(experts.gate_up_proj) is None  # stale until packed again
    pack_for_decode(model)
    after = fresh_packs(experts.gate_up_proj)
    assert after.data_ptr() == pointer and torch.equal(after, bf16_rows.pack(experts.gate_up_proj))


def _latent_reference(q, latent, r, scale, mask):
    """softmax(q latent^T * scale) latent[..., :r] in float64: q [B, T, H, D], latent [B, S, D]."""
    scores = torch.einsum("bthd,bsd->bths", q.double(), latent.double()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask.transpose(1, 2), float("-inf"))  # [B|1, T, 1, S]
    return torch.einsum("bths,bsr->bthr", scores.softmax(-1), latent[..., :r].double())


@pytest.mark.parametrize("T,per_row_mask", [(1, True), (3, False), (2, None)])
def test_latent_attention_matches_float64(T, per_row_mask):
    # D = 40 ends in a partial 32-wide chunk, r = 24 in a partial 16-wide one; S = 37 keys of a
    # 48-slot buffer (read in place); one batch row's mask shared by all, or one per row, or none
    B, H, D, r, S = 3, 4, 40, 24, 37
    q, buffer = _bf16(B, T, H, D, seed=7), _bf16(B, 48, D, seed=8)
    latent = buffer[:, :S]
    mask = None
    if per_row_mask is not None:
        mask = torch.rand(B if per_row_mask else 1, 1, T, S, generator=torch.Generator().manual_seed(9)) > 0.3
        mask[..., -1] = True
    out = bf16_rows.latent_attention(q, latent, r, 0.3, mask)
    exact = _latent_reference(q, latent, r, 0.3, mask)
    assert out.shape == (B, T, H, r) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), exact, atol=2e-2, rtol=2 ** -7)


def test_absorbed_decode_with_the_kernels_is_closer_to_float64_than_without(monkeypatch, one_thread):
    """A batch of 12 left-padded rows (> 8: SDPA's side of `use_latent_products`) decoding through MLA's
    absorbed path: logits of bf16 with `bf16_rows` (grouped W_UK / W_UV products, the latent attention)
    against float64, no further off than bf16 through oneDNN and SDPA."""
    from seekformer import ModelConfig, Transformer
    from seekformer.inference import KVCache

    torch.manual_seed(0)
    reference = Transformer(ModelConfig.preset("tiny-v3")).double().eval()
    ids = torch.randint(0, reference.config.vocab_size, (12, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[::3, :2] = False  # a third of the rows left-padded
    step = torch.randint(0, reference.config.vocab_size, (12, 1), generator=torch.Generator().manual_seed(4))

    def decode_logits(model):
        cache = KVCache.for_model(model, 12, attention_path="absorbed")
        with torch.inference_mode():
            model(ids, attention_mask=mask, cache=cache)
            return model(step, cache=cache)[:, -1].double()

    exact = decode_logits(reference)
    calls = []
    for name in ("grouped_rows", "latent_attention"):
        original = getattr(bf16_rows, name)
        monkeypatch.setattr(bf16_rows, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    errors = {}
    for kernel in ("bf16_rows", "onednn"):
        if kernel == "onednn":
            monkeypatch.setattr(bf16_rows, "available", lambda: False)
        model = Transformer(ModelConfig.preset("tiny-v3"))
        model.load_state_dict(reference.state_dict())
        model = model.to(torch.bfloat16).eval()
        pack_for_decode(model)
        errors[kernel] = float((decode_logits(model) - exact).abs().max())
        if kernel == "bf16_rows":
            assert {"grouped_rows", "latent_attention"} <= set(calls)
    assert errors["bf16_rows"] <= 1.25 * errors["onednn"] + 1e-3, errors


def test_rms_norm_matches_float64_and_serves_the_bf16_module(monkeypatch):
    from seekformer.model.layers import RMSNorm

    x, weight = _bf16(6, 2, 100, seed=11) * 3, _bf16(100, seed=12)
    out = bf16_rows.rms_norm(x, weight, 1e-6)
    exact = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * weight.double()
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), exact, rtol=2 ** -7, atol=0)  # two bf16 roundings at most
    with pytest.raises(ValueError, match="do not match"):
        bf16_rows.rms_norm(x, weight[:50], 1e-6)
    calls = []
    monkeypatch.setattr(bf16_rows, "rms_norm", lambda *a: calls.append(1) or out)
    norm = RMSNorm(100).to(torch.bfloat16)
    with torch.no_grad():
        norm(x)
    assert calls == [1]


def test_rope_pairs_equal_the_real_form_bit_for_bit(monkeypatch):
    """Decode's RoPE (bf16, no autograd) through the kernel library: the values of the real-arithmetic
    form training uses, for strided query/key views, one head or several, D/2 not a multiple of 16."""
    from seekformer.model.layers import apply_rope

    calls = []
    original = bf16_rows.rope_pairs
    monkeypatch.setattr(bf16_rows, "rope_pairs", lambda *a: calls.append(1) or original(*a))
    for B, T, H, D in ((5, 1, 8, 32), (2, 7, 1, 32), (3, 2, 4, 36)):
        x = _bf16(B, T, H, D + 16, seed=13)[..., 16:]  # a split view, as q_pe and k_pe are
        angles = torch.rand(B, T, D // 2, generator=torch.Generator().manual_seed(14)) * 300
        cos, sin = angles.cos() * 1.2, angles.sin() * 1.2
        real = apply_rope(x.clone().requires_grad_(), cos, sin, pairwise=True).detach()
        with torch.no_grad():
            fast = apply_rope(x, cos, sin, pairwise=True)
        assert torch.equal(fast, real) and fast.is_contiguous()
    assert len(calls) == 3


def test_packed_linear_leaves_many_rows_to_onednn(monkeypatch):
    """A decode step's few rows go through the kernel, a prefill's many rows through the plain product
    (oneDNN is faster there); both give the product."""
    linear = torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16).requires_grad_(False)
    pack_for_decode(linear)
    calls = []
    original = bf16_rows.rows
    monkeypatch.setattr(bf16_rows, "rows", lambda *a: calls.append(a[0].shape) or original(*a))
    for n in (3, bf16_rows.MAX_ROWS + 1):
        x = _bf16(n, 64, seed=15)
        with torch.no_grad():
            _assert_rounded_product(linear(x), x.double() @ linear.weight.double().t())
    assert calls == [(3, 64)]


def test_a_second_thread_waits_for_the_first_ones_build(monkeypatch):
    """While one thread compiles the library, another asking for it waits for that build (it was told
    "unavailable" and fell back to oneDNN for that call)."""
    import threading

    started, release = threading.Event(), threading.Event()
    library = object()

    def slow_build():
        started.set()
        release.wait(10)
        return library

    monkeypatch.setattr(bf16_rows, "_loaded", False)
    monkeypatch.setattr(bf16_rows, "_library", None)
    monkeypatch.setattr(bf16_rows, "_build", slow_build)
    results = []
    first = threading.Thread(target=lambda: results.append(bf16_rows._load()))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=lambda: results.append(bf16_rows._load()))
    second.start()
    second.join(0.2)
    assert second.is_alive() and results == []  # waiting, not answered "unavailable"
    release.set()
    first.join(10)
    second.join(10)
    assert results == [library, library]


def test_shapes_the_kernel_cannot_take_are_refused():
    """Checked before any C code runs (a mismatch would read or write out of bounds there)."""
    with pytest.raises(ValueError, match="not packable"):
        bf16_rows.pack(_bf16(40, 64, seed=0))  # 40 outputs: not whole blocks of 16
    with pytest.raises(ValueError, match="not packable"):
        bf16_rows.pack(_bf16(32, 7, seed=0))  # an odd number of inputs
    packed = bf16_rows.pack(_bf16(2, 32, 64, seed=1))
    x = _bf16(5, 64, seed=2)
    with pytest.raises(ValueError, match="do not add up"):
        bf16_rows.grouped_rows(x, torch.tensor([2, 4]), packed)
    with pytest.raises(ValueError, match="does not match"):
        bf16_rows.rows(x, packed[0].transpose(0, 1))
