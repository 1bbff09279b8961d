"""Engram wired into the Transformer: forward, decode with the cache, checkpoints, info, offload."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from seekformer import ModelConfig, Transformer, load_model
from seekformer.engram_offload import HOST_BUFFERS, offload_engram_tables
from seekformer.inference import KVCache, generate
from seekformer.model.stats import count_parameters

VOCAB = 64


def _tokenizer() -> Tokenizer:
    vocab = {f"w{i}": i for i in range(VOCAB - 4)}
    vocab.update({"Hello": VOCAB - 4, "hello": VOCAB - 3, " hello": VOCAB - 2, "HELLO": VOCAB - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _model(**overrides) -> Transformer:
    config = ModelConfig.preset(
        "tiny-v3", vocab_size=VOCAB, engram_layer_ids=[0, 2], engram_dim_per_ngram=32, engram_heads=4,
        engram_table_size=[101, 211], engram_pad_id=1, **overrides)
    model = Transformer(config)
    model.set_engram_tokenizer(_tokenizer())
    with torch.no_grad():  # a non-zero conv, so the conv history matters in decode
        for layer in model.engram_layers():
            layer.engram.conv.weight.normal_(0, 0.5)
    return model.eval()


def test_forward_needs_the_compression_table_first():
    model = Transformer(ModelConfig.preset("tiny-v3", vocab_size=VOCAB, engram_layer_ids=[1],
                                           engram_dim_per_ngram=32, engram_heads=4))
    with pytest.raises(RuntimeError, match="set_compression"):
        model(torch.randint(0, VOCAB, (1, 8)))
    with pytest.raises(ValueError, match="no Engram layers"):
        Transformer(ModelConfig.preset("tiny-v3")).set_engram_tokenizer(_tokenizer())


def test_engram_changes_the_output_and_stays_causal():
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        base = model(ids)
        changed = ids.clone()
        changed[:, 15:] = (changed[:, 15:] + 7) % VOCAB
        after = model(changed)
        assert torch.allclose(base[:, :15], after[:, :15], atol=1e-5)  # MoE batching reorders sums
        assert not torch.allclose(base[:, 15:], after[:, 15:])
        for layer in model.engram_layers():
            layer.engram.table.weight.mul_(3.0)
        assert not torch.allclose(model(ids), base)


def test_token_by_token_decode_equals_full_forward():
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, batch_size=2)
        steps = [model(ids[:, :7], cache=cache)]
        for t in range(7, 20):
            steps.append(model(ids[:, t:t + 1], cache=cache))
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


def test_greedy_generation_equals_argmax_of_full_forward():
    model = _model(num_nextn_predict_layers=0)
    prompt = torch.randint(0, VOCAB, (1, 6))
    out = generate(model, prompt, max_new_tokens=8, temperature=0.0)
    tokens = prompt[0].tolist()
    with torch.no_grad():
        for _ in range(8):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert out.tokens[0] == tokens[6:]


def test_save_load_round_trip_keeps_tables_and_compression(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    engram = loaded.model.layers[2].engram
    assert torch.equal(engram.compression, model.model.layers[2].engram.compression)
    assert ModelConfig.from_hf(tmp_path).engram_layer_ids == [0, 2]
    from safetensors import safe_open

    keys = safe_open(str(tmp_path / "model.safetensors"), "pt").keys()
    assert {"model.layers.0.engram.table.weight", "model.layers.2.engram.compression",
            "model.layers.2.engram.conv.weight"} <= set(keys)


def test_info_counts_engram_parameters_separately():
    model = _model()
    counts = count_parameters(model)
    expected = sum(p.numel() for layer in model.engram_layers() for p in layer.engram.parameters())
    assert counts.engram == expected > 0
    assert counts.total == sum(p.numel() for p in model.parameters()) - counts.mtp
    # per token a layer reads (N-1) orders x K heads rows of 32/K numbers: 64 table numbers; the rest
    # of each table is inactive, exactly like the routed experts a token does not use
    plain = count_parameters(Transformer(ModelConfig.preset("tiny-v3", vocab_size=VOCAB)))
    tables = sum(layer.engram.table.weight.numel() for layer in model.engram_layers())
    assert counts.engram_lookup == 2 * 2 * 32
    assert counts.active - plain.active == counts.engram - tables + counts.engram_lookup


def test_offloaded_tables_give_the_same_outputs_and_row_sparse_gradients():
    model = _model(num_nextn_predict_layers=0)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        before = model(ids)
    offload_engram_tables(model, host="cpu")
    for layer in model.engram_layers():
        layer.engram.sparse_grad = True
    model.train()
    out = model(ids)
    with torch.no_grad():
        assert torch.allclose(out, before, atol=1e-6)
    out.float().pow(2).mean().backward()
    table = model.model.layers[0].engram
    grad = table.table.weight.grad
    assert grad.is_sparse
    touched = set(grad.coalesce().indices()[0].tolist())
    rows = (table.hash_rows(ids) + table.offsets).flatten().tolist()
    assert touched == set(rows)


def test_offload_puts_tables_and_hashing_on_the_host():
    """The backbone on "meta" (standing in for an accelerator), the tables on the CPU: hashing reads only
    host buffers and gathers real rows there, and the prefetch sends them to the backbone's device."""
    model = _model(num_nextn_predict_layers=0)
    ids = torch.randint(0, VOCAB, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    expected = {layer.layer_idx: layer.engram.lookup(ids, None, mask) for layer in model.engram_layers()}
    offload = offload_engram_tables(model, device="meta", host="cpu")
    assert model.device.type == "meta" and model.model.embed_tokens.weight.is_meta
    for layer in model.engram_layers():
        engram = layer.engram
        on_host = [engram.table.weight, *(getattr(engram, name) for name in HOST_BUFFERS)]
        assert all(t.device.type == "cpu" for t in on_host) and not engram.table.weight.is_pinned()
        assert engram.key_proj.weight.is_meta and engram.conv.weight.is_meta and engram.hidden_norm.weight.is_meta
        assert torch.equal(engram.lookup(ids, None, mask), expected[layer.layer_idx])
    memories = offload.prefetch(ids, "meta", attention_mask=mask)
    assert sorted(memories) == sorted(expected)
    for idx, (memory, event) in memories.items():
        assert memory.is_meta and memory.shape == expected[idx].shape and event is None


def test_offloaded_generation_uses_the_prefetched_rows(one_thread):
    model = _model()
    prompts = [[5, 9, 3, 60, 61, 7, 8], [4, 12], [33, 34, 35, 36]]
    kwargs = dict(max_new_tokens=10, stop_tokens=[])
    expected = [generate(model, prompts, **kwargs).tokens,
                generate(model, prompts, speculative="mtp", num_draft_tokens=2, **kwargs).tokens]
    offload = offload_engram_tables(model, host="cpu")
    given = []
    for layer in model.engram_layers():  # runs after the offload's hook: sees what the layer is given
        layer.engram.register_forward_pre_hook(
            lambda module, args, kw: given.append(kw.get("memory") is not None), with_kwargs=True)
    got = [generate(model, prompts, **kwargs).tokens,
           generate(model, prompts, speculative="mtp", num_draft_tokens=2, **kwargs).tokens]
    assert got == expected
    assert given and all(given) and not offload._memories
    offload.remove()
    given.clear()
    assert generate(model, prompts, **kwargs).tokens == expected[0] and not any(given)


def test_engram_gates_command_writes_html_and_png(tmp_path, capsys):
    from seekformer.cli import main
    from seekformer.tokenizer import Tokenizer

    model = _model()
    model.save_pretrained(tmp_path / "m")
    Tokenizer(_tokenizer(), bos_token="w0", eos_token="w1", pad_token=None).save(tmp_path / "m")
    out = tmp_path / "gates.html"
    assert main(["engram-gates", "--model", str(tmp_path / "m"), "--text", "Hello w3 w4 hello w3 w4",
                 "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("<h2>layer") == 2 and "alpha=" in page and "Hello" in page
    assert (tmp_path / "gates.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "layer 0: mean alpha" in printed and "layer 2: mean alpha" in printed
    alphas = [float(a) for a in __import__("re").findall(r'alpha=([0-9.]+)"', page)]
    assert len(alphas) == 2 * 6 and all(0 < a < 1 for a in alphas)
