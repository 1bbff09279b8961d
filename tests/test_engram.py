"""Engram conditional memory: compression, hashing, gate, conv, decode state, meta device, gradients."""

from __future__ import annotations

import math
import unicodedata

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from seekformer.config import ConfigError, ModelConfig
from seekformer.model.engram import Engram, EngramState, compression_table, engram_primes
from seekformer.tokenizer import Tokenizer as SeekformerTokenizer

CORPUS = [
    "Hello hello HELLO héllo Héllo, hello! Hello.",
    "café Café CAFÉ naïve",
    "the\tcat  sat\n\non   the mat",
    "日本語",
] * 20
EXTRA_VOCAB = 10  # the model's vocab is larger than the tokenizer's (padded embedding)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|pad|>", "<|EOS|>"], show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens([AddedToken(s, normalized=False) for s in ["\t\n", "  ", "HeLLo"]])
    return tok


def make_config(tokenizer: Tokenizer, **overrides) -> ModelConfig:
    values = dict(
        vocab_size=tokenizer.get_vocab_size() + EXTRA_VOCAB, hidden_size=64, engram_layer_ids=[3, 1],
        engram_max_ngram=3, engram_heads=4, engram_dim_per_ngram=16, engram_table_size=[31, 29],
        engram_kernel=3, engram_seed=7,
    )
    values.update(overrides)
    return ModelConfig.preset("tiny-v3", **values)


def make_engram(tokenizer: Tokenizer, layer_id: int = 1, conv: bool = True, **overrides) -> Engram:
    config = make_config(tokenizer, **overrides)
    torch.manual_seed(0)
    m = Engram(config, layer_id)
    m.set_compression(compression_table(tokenizer))
    if conv:  # non-trivial conv and norm weights so they are exercised
        with torch.no_grad():
            m.conv.weight.normal_(0, 0.5)
            for norm in (m.hidden_norm, m.key_norm, m.conv_norm):
                norm.weight.uniform_(0.5, 1.5)
            m.key_proj.bias.normal_(0, 0.1)
            m.value_proj.bias.normal_(0, 0.1)
    return m


# ------------------------------------------------------------------ independent reference (steps 1-3)
def ref_compression(tok: Tokenizer) -> list[int]:
    """Step 1 written with the `tokenizers` normalizers instead of unicodedata."""
    norm = normalizers.Sequence([
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
    ])
    keys: dict[str, int] = {}
    out = []
    for i in range(tok.get_vocab_size()):
        text = tok.decode([i], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tok.id_to_token(i)
        else:
            key = norm.normalize_str(text)
            if key != " ":
                key = normalizers.Strip().normalize_str(key)
            key = key or text
        if key not in keys:
            keys[key] = len(keys)
        out.append(keys[key])
    return out


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def ref_primes(config: ModelConfig) -> dict[int, list[list[int]]]:
    used: set[int] = set()
    out = {}
    for layer in config.engram_layer_ids:
        out[layer] = []
        for size in config.engram_table_sizes:
            heads: list[int] = []
            for _ in range(config.engram_heads):
                p = size if not heads else heads[-1] + 1
                while p in used or not is_prime(p):
                    p += 1
                heads.append(p)
                used.add(p)
            out[layer].append(heads)
    return out


def wrap64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def ref_hash_rows(config: ModelConfig, layer: int, comp: list[int], ids: list[list[int]]) -> list:
    """Steps 2-3 with Python ints: [B][T][(N-1)*K] rows."""
    n_max = config.engram_max_ngram
    v_prime = max(comp) + 1
    rng = np.random.default_rng(config.engram_seed + 10007 * layer)
    half = max(1, (2**63 - 1) // v_prime // 2)
    mult = [2 * int(r) + 1 for r in rng.integers(0, half, size=n_max)]
    primes = ref_primes(config)[layer]
    pad = comp[config.engram_pad_token]

    def cid(raw: int) -> int:
        return comp[raw] if raw < len(comp) else pad  # ids past the tokenizer map to the pad id

    out = []
    for seq in ids:
        rows_seq = []
        for t in range(len(seq)):
            rows = []
            for n in range(2, n_max + 1):
                mix = 0
                for k in range(n):
                    x = cid(seq[t - k]) if t - k >= 0 else pad
                    mix ^= wrap64(x * mult[k])
                rows += [mix % p for p in primes[n - 2]]
            rows_seq.append(rows)
        out.append(rows_seq)
    return out


def ref_forward(m: Engram, hidden: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 4-6 in float64 from the module's weights: (Y [B, T, D], alpha [B, T])."""
    p = {k: v.detach().double() for k, v in m.state_dict().items() if v.is_floating_point()}
    eps, d, n = m.config.rms_norm_eps, m.hidden_size, m.max_ngram
    b, t = ids.shape
    rows = m.hash_rows(ids) + m.offsets
    e = p["table.weight"][rows].reshape(b, t, -1)
    k = e @ p["key_proj.weight"].T + p["key_proj.bias"]
    v = e @ p["value_proj.weight"].T + p["value_proj.bias"]

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    s = (rms(hidden.double(), p["hidden_norm.weight"]) * rms(k, p["key_norm.weight"])).sum(-1) / math.sqrt(d)
    s = torch.sign(s) * torch.sqrt(torch.clamp(s.abs(), min=1e-6))
    alpha = 1 / (1 + torch.exp(-s))
    vt = alpha[..., None] * v
    u = rms(vt, p["conv_norm.weight"])
    w = p["conv.weight"][:, 0, :]  # [D, kernel]; tap i looks (kernel-1-i)*N positions back
    c = torch.zeros_like(u)
    for pos in range(t):
        for i in range(m.kernel):
            src = pos - (m.kernel - 1 - i) * n
            if src >= 0:
                c[:, pos] += w[:, i] * u[:, src]
    return vt + c * torch.sigmoid(c), alpha


# ------------------------------------------------------------------ compression
def test_compression_merges_variants_and_keeps_bytes_apart(tokenizer):
    table = compression_table(tokenizer)
    assert table.dtype == torch.long and table.shape == (tokenizer.get_vocab_size(),)
    assert table.tolist() == ref_compression(tokenizer)
    tid = tokenizer.token_to_id
    c = table.tolist()
    hello = {c[tid(s)] for s in ["Hello", "Ġhello", "ĠHello", "ĠHÃ©llo", "ĠhÃ©llo", "ĠHELLO", "HeLLo"]}
    assert len(hello) == 1
    assert len({c[tid(s)] for s in ["cafÃ©", "ĠCafÃ©", "ĠCAFÃī"]}) == 1
    assert c[tid("Ã©")] == c[tid("e")] == c[tid("Ãī")]  # é, É -> e
    assert len({c[tid(s)] for s in ["Ġ", "ĉ", "Ċ", "ĠĠ", "\t\n", "  "]}) == 1  # whitespace -> " "
    assert c[tid("<|EOS|>")] != c[tid("<|pad|>")]
    # tokens that decode to U+FFFD (partial UTF-8) keep an id of their own
    partial = [i for i in range(len(c)) if "\ufffd" in tokenizer.decode([i])]
    assert len(partial) > 50
    assert len({c[i] for i in partial}) == len(partial)
    others = {c[i] for i in range(len(c)) if i not in set(partial)}
    assert not others & {c[i] for i in partial}
    # ids in order of first appearance
    seen = -1
    for x in c:
        assert x <= seen + 1
        seen = max(seen, x)
    assert seen + 1 < len(c)


def test_compression_accepts_wrappers(tokenizer):
    expected = compression_table(tokenizer)

    class Wrapper:  # seekformer-style wrapper: inner tokenizers.Tokenizer at `.tokenizer`
        def __init__(self, tok):
            self.tokenizer = tok
            self.vocab_size = tok.get_vocab_size()

        def decode(self, ids):
            return self.tokenizer.decode(ids)

    class Plain:  # no inner tokenizer: decode + id_to_token only
        def __init__(self, tok):
            self._tok = tok
            self.vocab_size = tok.get_vocab_size()

        def decode(self, ids, skip_special_tokens=False):
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

        def id_to_token(self, i):
            return self._tok.id_to_token(i)

    assert torch.equal(compression_table(Wrapper(tokenizer)), expected)
    assert torch.equal(compression_table(Plain(tokenizer)), expected)
    ours = SeekformerTokenizer(tokenizer, bos_token="<|EOS|>", eos_token="<|EOS|>")  # inner one at `.backend`
    assert torch.equal(compression_table(ours), expected)


MULTILINGUAL = [  # real words in several scripts, capitals included (Greek final sigma: ΟΣ, ΗΣ, ΑΣ)
    "Ο ΣΩΚΡΑΤΗΣ ΗΤΑΝ ΦΙΛΟΣΟΦΟΣ ΤΗΣ ΑΘΗΝΑΣ. Ο Σωκράτης ήταν φιλόσοφος της Αθήνας. ΟΔΟΣ ΟΔΟΣ ΝΟΜΟΣ ΚΟΣΜΟΣ",
    "Москва — столица России. МОСКВА ЁЛКА ёлка Ёлка",
    "Straße STRASSE Größe GRÖSSE Übung ÜBUNG Ärger",
    "İstanbul ISTANBUL ıslak Işık IŞIK",
    "Ça va très bien. ÉCOLE école Œuvre ŒUVRE",
    "Tiếng Việt TIẾNG VIỆT Đà Nẵng",
    "東京は日本の首都です。カタカナ ひらがな",
    "مرحبا بالعالم", "नमस्ते दुनिया", "ﬁne ﬀ Ⅻ ①",
]


def test_lowercase_is_per_character_like_the_reference_normaliser():
    """Every character Python's Unicode database knows lowercases as `tokenizers`' Lowercase does, and
    strings are mapped per character (Python's `str.lower()` turns a word-final Σ into ς)."""
    from seekformer.model.engram import _lowercase, normalize_token_text

    known = [chr(c) for c in range(1, 0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    reference = normalizers.Lowercase().normalize_str("\x00".join(known)).split("\x00")
    assert [_lowercase(c) for c in known] == reference
    for word in ("ΟΔΟΣ", "ΦΙΛΟΣΟΦΟΣ.", "Σ", "ΑΣ Β", "İSTANBUL"):
        assert _lowercase(word) == normalizers.Lowercase().normalize_str(word)
    assert normalize_token_text("ΟΔΟΣ") == "οδοσ" != "ΟΔΟΣ".lower()


def test_compression_matches_the_reference_on_a_multilingual_vocabulary():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(MULTILINGUAL * 10, trainer)
    texts = [tok.decode([i]) for i in range(tok.get_vocab_size())]
    assert any(len(t) > 1 and t.endswith("Σ") and t[-2].isalpha() for t in texts)  # where str.lower differs
    assert compression_table(tok).tolist() == ref_compression(tok)


# ------------------------------------------------------------------ primes and hashing
def test_primes_walk(tokenizer):
    config = make_config(tokenizer, engram_layer_ids=[3, 0, 2], engram_table_size=[40, 31])
    primes = engram_primes(config)
    assert list(primes) == [3, 0, 2]
    flat = [p for layer in primes.values() for order in layer for p in order]
    assert len(flat) == len(set(flat)) == 3 * 2 * 4
    assert all(is_prime(p) for p in flat)
    assert primes == ref_primes(config)
    for layer in primes.values():
        for order, size in zip(layer, config.engram_table_sizes):
            assert order[0] >= size and order == sorted(order)
    # worked by hand: order 3 of layer 3 skips the primes order 2 took; layer 0 starts after all of them
    assert primes[3] == [[41, 43, 47, 53], [31, 37, 59, 61]]
    assert primes[0] == [[67, 71, 73, 79], [83, 89, 97, 101]]


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
])
def test_hash_rows_match_reference(tokenizer, device):
    m = make_engram(tokenizer, layer_id=1).to(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, m.config.vocab_size, (3, 17), generator=g)
    ids[0, :4] = m.config.engram_pad_token
    rows = m.hash_rows(ids.to(device))
    assert rows.device.type == device and rows.dtype == torch.long
    assert rows.shape == (3, 17, 2 * 4)
    comp = compression_table(tokenizer).tolist()
    assert rows.cpu().tolist() == ref_hash_rows(m.config, 1, comp, ids.tolist())
    other = make_engram(tokenizer, layer_id=3)
    assert other.hash_rows(ids).cpu().tolist() == ref_hash_rows(m.config, 3, comp, ids.tolist())


# ------------------------------------------------------------------ gate, conv, causality
def test_zero_conv_gives_gated_value(tokenizer):
    m = make_engram(tokenizer, conv=False)
    assert not m.conv.weight.any()
    hidden = torch.randn(2, 9, 64)
    ids = torch.randint(0, m.config.vocab_size, (2, 9))
    y, alpha = m(hidden, ids, return_gate=True)
    e = m.table(m.hash_rows(ids) + m.offsets).reshape(2, 9, -1)
    assert torch.equal(y, alpha.unsqueeze(-1) * m.value_proj(e))


def test_gate_and_conv_match_float64_reference(tokenizer):
    m = make_engram(tokenizer, engram_max_ngram=4, engram_table_size=[31, 29, 37], engram_dim_per_ngram=12,
                    engram_heads=3)
    hidden = torch.randn(2, 19, 64)
    ids = torch.randint(0, m.config.vocab_size, (2, 19))
    m.keep_gate = True
    y, alpha = m(hidden, ids, return_gate=True)
    y_ref, alpha_ref = ref_forward(m, hidden, ids)
    assert ((alpha > 0) & (alpha < 1)).all()
    assert torch.equal(m.last_gate, alpha.detach())
    torch.testing.assert_close(alpha.double(), alpha_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    # the conv actually contributes here
    assert not torch.allclose(y, alpha.unsqueeze(-1) * m.value_proj(
        m.table(m.hash_rows(ids) + m.offsets).reshape(2, 19, -1)), atol=1e-3)


def test_conv_weight_layout_is_torch_conv1d(tokenizer):
    """`conv.weight` [D, 1, w] means what nn.Conv1d(groups=D, dilation=N) with left padding means."""
    m = make_engram(tokenizer)
    x = torch.randn(2, 15, 64)
    pad = (m.kernel - 1) * m.max_ngram
    expected = F.conv1d(F.pad(x.transpose(1, 2), (pad, 0)), m.conv.weight, dilation=m.max_ngram, groups=64)
    torch.testing.assert_close(m._causal_conv(x, None), expected.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_causal(tokenizer):
    m = make_engram(tokenizer)
    hidden = torch.randn(2, 16, 64)
    ids = torch.randint(0, m.config.vocab_size, (2, 16))
    y = m(hidden, ids)
    for j in (0, 5, 15):
        ids2, hidden2 = ids.clone(), hidden.clone()
        ids2[:, j:] = (ids2[:, j:] + 1) % m.config.vocab_size
        hidden2[:, j:] += 1
        y2 = m(hidden2, ids2)
        assert torch.equal(y2[:, :j], y[:, :j])
        assert not torch.equal(y2[:, j], y[:, j])


# ------------------------------------------------------------------ decode state
def test_incremental_decode_matches_full_forward(tokenizer):
    m = make_engram(tokenizer)
    hidden = torch.randn(2, 14, 64)
    ids = torch.randint(0, m.config.vocab_size, (2, 14))
    full = m(hidden, ids)
    state = EngramState()
    outs = [m(hidden[:, :5], ids[:, :5], state)]
    for t in range(5, 14):
        outs.append(m(hidden[:, t:t + 1], ids[:, t:t + 1], state))
    assert state.ids.shape == (2, 2) and state.conv.shape == (2, (3 - 1) * 3, 64)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-6, atol=1e-6)
    # a 1-token prompt shorter than the window and chunks of 3
    state = EngramState()
    outs = [m(hidden[:, :1], ids[:, :1], state)]
    outs += [m(hidden[:, t:t + 3], ids[:, t:t + 3], state) for t in range(1, 14, 3)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-6, atol=1e-6)


def test_state_rollback_and_reorder(tokenizer):
    m = make_engram(tokenizer)
    hidden = torch.randn(3, 10, 64)
    ids = torch.randint(0, m.config.vocab_size, (3, 10))
    full = m(hidden, ids)
    state = EngramState(keep=3)
    m(hidden[:, :6], ids[:, :6], state)
    wrong = torch.randint(0, m.config.vocab_size, (3, 3))
    m(torch.randn(3, 3, 64), wrong, state)  # speculative tokens, then rejected
    state.rollback(3)
    with pytest.raises(ValueError, match="roll back"):
        state.rollback(4)
    state.reorder(torch.tensor([2, 0]))
    out = m(hidden[[2, 0], 6:], ids[[2, 0], 6:], state)
    torch.testing.assert_close(out, full[[2, 0], 6:], rtol=1e-6, atol=1e-6)


def test_rollback_then_fewer_tokens_than_rolled_back(tokenizer):
    """rollback(k) followed by fewer than k tokens keeps the whole window and conv history (N=3, w=3:
    2 ids and 6 conv inputs), and rolling back again works."""
    m = make_engram(tokenizer)
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 12, 64, generator=gen)
    ids = torch.randint(0, m.config.vocab_size, (2, 12), generator=gen)
    full = m(hidden, ids)

    def rejected(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(2, n, 64, generator=gen), torch.randint(0, m.config.vocab_size, (2, n), generator=gen)

    state = EngramState(keep=3)
    outs = [m(hidden[:, :6], ids[:, :6], state)]
    m(*rejected(3), state)
    state.rollback(3)
    outs.append(m(hidden[:, 6:7], ids[:, 6:7], state))  # 1 < 3 tokens
    m(*rejected(2), state)
    state.rollback(2)
    outs.append(m(hidden[:, 7:], ids[:, 7:], state))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-6, atol=1e-6)
    assert state.ids.shape == (2, 2 + 3) and state.conv.shape == (2, 6 + 3, 64)


def test_per_row_rollback_and_padding(tokenizer):
    """Rows roll back different counts; padded positions (left, right, holes) never enter the history."""
    m = make_engram(tokenizer)
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(2, 10, 64, generator=gen)
    ids = torch.randint(0, m.config.vocab_size, (2, 10), generator=gen)
    state = EngramState(keep=2)
    m(hidden[:, :5], ids[:, :5], state)
    m(hidden[:, 5:7], ids[:, 5:7], state)
    state.rollback(torch.tensor([2, 0]))  # row 0 forgets positions 5-6, row 1 keeps them
    with pytest.raises(ValueError, match="roll back"):
        state.rollback(torch.tensor([1, 3]))
    # row 0 continues with positions 7-9 after a pad, row 1 with position 7 and a hole before 8-9
    row0_cols, row1_cols = [0, 7, 8, 9], [7, 0, 8, 9]  # the pad and the hole reuse position 0's values
    step_ids = torch.stack((ids[0, row0_cols], ids[1, row1_cols]))
    step_hidden = torch.stack((hidden[0, row0_cols], hidden[1, row1_cols]))
    mask = torch.tensor([[0, 1, 1, 1], [1, 0, 1, 1]])
    out = m(step_hidden, step_ids, state, attention_mask=mask)
    row0 = m(hidden[:1, [0, 1, 2, 3, 4, 7, 8, 9]], ids[:1, [0, 1, 2, 3, 4, 7, 8, 9]])[0, -3:]
    row1 = m(hidden[1:], ids[1:])[0, -3:]
    torch.testing.assert_close(out[0, 1:], row0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[1, [0, 2, 3]], row1, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------ meta device, gradients, checkpoints
def test_meta_device_full_size():
    config = ModelConfig.preset("deepseek-v3", engram_layer_ids=[2, 15])
    with torch.device("meta"):
        m = Engram(config, 15)
    primes = engram_primes(config)[15]
    assert m.table.weight.is_meta and m.table.weight.shape == (sum(sum(o) for o in primes), 512 // 8)
    assert sum(sum(o) for o in primes) > 2 * 8 * 5 * config.vocab_size
    assert m.compression.shape == (config.vocab_size,) and m.compression.is_meta


@pytest.mark.parametrize("sparse", [False, True])
def test_gradient_touches_only_looked_up_rows(tokenizer, sparse):
    m = make_engram(tokenizer)
    m.sparse_grad = sparse
    hidden = torch.randn(2, 7, 64)
    ids = torch.randint(0, m.config.vocab_size, (2, 7))
    m(hidden, ids).square().sum().backward()
    rows = set((m.hash_rows(ids) + m.offsets).flatten().tolist())
    grad = m.table.weight.grad
    if sparse:
        assert grad.is_sparse
        grad = grad.coalesce()
        assert set(grad.indices()[0].tolist()) == rows
        grad = grad.to_dense()
    touched = set(grad.abs().sum(-1).nonzero().flatten().tolist())
    assert touched == rows
    assert len(rows) < m.table.num_embeddings


def test_gradcheck_float64(tokenizer):
    m = make_engram(tokenizer, hidden_size=8, engram_dim_per_ngram=4, engram_heads=2,
                    engram_table_size=[11, 13]).double()
    ids = torch.randint(0, m.config.vocab_size, (2, 8))
    hidden = torch.randn(2, 8, 8, dtype=torch.float64, requires_grad=True)
    params = {name: p.detach().clone().requires_grad_() for name, p in m.named_parameters()
              if name in ("table.weight", "conv.weight", "key_proj.weight", "hidden_norm.weight")}

    def f(hidden, *values):
        return torch.func.functional_call(m, dict(zip(params, values)), (hidden, ids))

    assert torch.autograd.gradcheck(f, (hidden, *params.values()))


def test_checkpoint_roundtrip_and_missing_compression(tokenizer):
    m = make_engram(tokenizer)
    hidden = torch.randn(1, 6, 64)
    ids = torch.randint(0, m.config.vocab_size, (1, 6))
    fresh = Engram(m.config, 1)
    with pytest.raises(RuntimeError, match="set_compression"):
        fresh(hidden, ids)
    sd = m.state_dict()
    assert {"compression", "multipliers", "primes", "offsets", "table.weight", "conv.weight"} <= set(sd)
    assert sd["compression"].shape == (m.config.vocab_size,)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(hidden, ids), m(hidden, ids))
    # built on meta, materialised, loaded: the checkpoint carries every buffer
    with torch.device("meta"):
        lazy = Engram(m.config, 1)
    with pytest.raises(RuntimeError, match="materialise"):
        lazy.set_compression(compression_table(tokenizer))
    lazy.to_empty(device="cpu")
    lazy.primes.zero_()
    with pytest.raises(RuntimeError, match="primes/offsets"):
        lazy(hidden, ids)
    lazy.load_state_dict(sd)
    assert torch.equal(lazy(hidden, ids), m(hidden, ids))
    # a table that does not match the multipliers (different tokenizer) is refused
    sd = dict(sd, compression=torch.zeros_like(sd["compression"]))
    fresh.load_state_dict(sd)
    with pytest.raises(RuntimeError, match="compression"):
        fresh(hidden, ids)
    with pytest.raises(ValueError, match="compression table"):
        fresh.set_compression(torch.tensor([0, 2, 2]))


def test_bad_config(tokenizer):
    with pytest.raises(ConfigError, match="engram_layer_ids"):
        make_config(tokenizer, engram_layer_ids=[4])
    with pytest.raises(ConfigError, match="divisible"):
        make_config(tokenizer, engram_dim_per_ngram=30)
    with pytest.raises(ValueError, match="not in engram_layer_ids"):
        Engram(make_config(tokenizer), 2)
