"""generate(): greedy parity with transformers, sampling, streaming, errors, MTP speculative decoding."""

import pytest
import torch
from conftest import randomize_norms_and_bias
from hf_models import V3_BASE, VOCAB, hf_model

from seekformer import ModelConfig, Transformer, load_model
from seekformer.inference import GenerationStream, KVCache, SamplingParams, generate
from seekformer.inference.sampling import probabilities
from seekformer.inference.speculative import MTPDrafter

PROMPT_LENGTHS = (9, 3, 14)


def _peaked_pair(tmp_path, kind):
    """A transformers model and its seekformer copy; a scaled output head keeps argmax free of near-ties."""
    reference = hf_model(kind)
    randomize_norms_and_bias(reference)
    with torch.no_grad():
        reference.lm_head.weight.mul_(30)
    reference.save_pretrained(tmp_path)
    return reference, load_model(tmp_path)


def _prompts(lengths=PROMPT_LENGTHS, vocab=VOCAB, seed=1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=gen).tolist() for n in lengths]


def _mtp_model(eps: float, depth: int, vocab: int = VOCAB, seed: int = 0, **config) -> Transformer:
    """A random V3 model with `depth` MTP modules that roughly imitate it.

    Attention and MLP outputs are scaled by `eps`, so the main model is close to a bigram model
    f(last token); each MTP module's eh_proj passes the token embedding through, so it predicts
    f(its input token), which is what the main model will say one step later. Smaller eps, higher
    acceptance; never exact, so both acceptance and rejection happen. `config` adds hub config fields.
    """
    torch.manual_seed(seed)
    config = ModelConfig.from_hf({"model_type": "deepseek_v3", **V3_BASE, "vocab_size": vocab,
                                  "num_nextn_predict_layers": depth, "eos_token_id": None, **config})
    model = Transformer(config).eval()
    H = config.hidden_size
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                param.mul_(eps)
        model.lm_head.weight.mul_(30)
        for layer in model.mtp:
            layer.eh_proj.weight[:, :H].copy_(torch.eye(H))
            layer.eh_proj.weight[:, H:].mul_(eps)
    return model


# ---------------------------------------------------------------------------- greedy parity
@pytest.mark.parametrize("kind", ["v3", "v2", "llama"])
def test_greedy_matches_transformers(tmp_path, kind):
    reference, model = _peaked_pair(tmp_path, kind)
    prompts = _prompts()
    width = max(PROMPT_LENGTHS)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[:, width:]
        single = reference.generate(ids[1:2, width - 3:], max_new_tokens=64, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, 3:]
    out = generate(model, prompts, max_new_tokens=64, stop_tokens=[])
    assert out.tokens == expected.tolist()
    assert out.finish_reasons == ["length"] * 3
    assert generate(model, prompts[1], max_new_tokens=64, stop_tokens=[]).tokens == [single.tolist()]
    stats = out.stats
    assert stats.prompt_tokens == sum(PROMPT_LENGTHS) and stats.new_tokens == 3 * 64
    assert stats.decode_tokens == 3 * 63 and stats.decode_steps == 63 and stats.acceptance_rate is None


def test_right_padded_tensor_and_stop_tokens(tmp_path):
    _, model = _peaked_pair(tmp_path, "v3")
    prompts = _prompts()
    free = generate(model, prompts, max_new_tokens=20, stop_tokens=[]).tokens
    ids = torch.zeros(3, 14, dtype=torch.long)
    mask = torch.zeros(3, 14, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(p), 1
    assert generate(model, ids, attention_mask=mask, max_new_tokens=20, stop_tokens=[]).tokens == free
    stop = free[0][5]
    out = generate(model, prompts, max_new_tokens=20, stop_tokens=[stop])
    cut = [row[: row.index(stop) + 1] if stop in row else row for row in free]
    assert out.tokens == cut
    assert out.finish_reasons == ["stop" if stop in row else "length" for row in free]


def test_stops_at_the_context_length(tmp_path):
    _, model = _peaked_pair(tmp_path, "v2")
    context = model.config.max_position_embeddings
    prompts = [[5] * (context - 3), [6] * 10]
    out = generate(model, prompts, max_new_tokens=8, stop_tokens=[])
    assert [len(t) for t in out.tokens] == [3, 8]
    assert out.finish_reasons == ["length", "length"]


# ---------------------------------------------------------------------------- sampling
def test_sampling_filters_match_transformers():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_k, top_p in ((0.7, None, 0.9), (1.3, 10, None), (0.5, 7, 0.6), (1.0, None, 0.3)):
        scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p:
            scores = TopPLogitsWarper(top_p)(None, scores)
        got = probabilities(logits, SamplingParams(temperature, top_k, top_p))
        assert torch.allclose(got, scores.softmax(-1), atol=1e-6)


def test_seeded_sampling_is_reproducible(tmp_path):
    _, model = _peaked_pair(tmp_path, "v3")
    with torch.no_grad():
        model.lm_head.weight.div_(30)  # a flat distribution, so seeds matter
    prompts = _prompts()
    kwargs = dict(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, stop_tokens=[])
    a, b = generate(model, prompts, seed=0, **kwargs), generate(model, prompts, seed=0, **kwargs)
    c = generate(model, prompts, seed=1, **kwargs)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_streaming_yields_every_token(tmp_path):
    _, model = _peaked_pair(tmp_path, "v3")
    prompts = _prompts()
    stream = generate(model, prompts, max_new_tokens=10, stream=True, stop_tokens=[])
    assert isinstance(stream, GenerationStream) and stream.output is None
    rows: list[list[int]] = [[], [], []]
    last = {}
    for piece in stream:
        assert not torch.is_inference_mode_enabled()  # the mode does not leak into the caller's loop
        assert piece.row not in last  # nothing after a row's final piece
        rows[piece.row] += piece.tokens
        if piece.finish_reason:
            last[piece.row] = piece.finish_reason
    assert rows == stream.output.tokens == generate(model, prompts, max_new_tokens=10, stop_tokens=[]).tokens
    assert last == {0: "length", 1: "length", 2: "length"}


# ---------------------------------------------------------------------------- errors
def test_clear_errors(tmp_path):
    _, model = _peaked_pair(tmp_path, "v3")
    context = model.config.max_position_embeddings
    cases = [
        (dict(input_ids=[1] * (context + 1)), "longer than the model's context"),
        (dict(input_ids=[]), "empty prompt"),
        (dict(input_ids=[[1, 2], []]), r"empty prompt \(row 1\)"),
        (dict(input_ids="hello"), "encode text with the tokenizer"),
        (dict(input_ids=[1, VOCAB]), "vocab_size"),
        (dict(input_ids=[1, 2], temperature=-1), "temperature"),
        (dict(input_ids=[1, 2], temperature=float("nan")), "temperature"),
        (dict(input_ids=[1, 2], top_p=0.0), "top_p"),
        (dict(input_ids=[1, 2], top_p=1.5), "top_p"),
        (dict(input_ids=[1, 2], top_k=-3), "top_k"),
        (dict(input_ids=[1, 2], max_new_tokens=0), "max_new_tokens"),
        (dict(input_ids=[1, 2], speculative="mtp"), "no.*Multi-Token Prediction|none"),
        (dict(input_ids=[1, 2], speculative="medusa"), "unknown speculative"),
        (dict(input_ids=[1, 2], num_draft_tokens=2), "only used with speculative"),
        (dict(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 0, 1]])), "contiguous"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            generate(model, **kwargs)


# ---------------------------------------------------------------------------- MTP speculative decoding
@pytest.mark.parametrize("depth,drafts", [(1, 1), (1, 3), (2, 2), (2, 3)])
def test_speculative_greedy_equals_greedy(depth, drafts):
    model = _mtp_model(0.3, depth)
    prompts = _prompts((9, 3, 14, 5))
    plain = generate(model, prompts, max_new_tokens=40)
    fast = generate(model, prompts, max_new_tokens=40, speculative="mtp", num_draft_tokens=drafts)
    assert fast.tokens == plain.tokens
    rate = fast.stats.acceptance_rate
    assert 0.3 < rate < 1  # both outcomes happen, rows of the batch diverge
    assert fast.stats.decode_steps < plain.stats.decode_steps
    assert len(fast.stats.acceptance_per_depth) == drafts


def test_speculative_stream_and_stop_tokens():
    model = _mtp_model(0.3, 1)
    prompts = _prompts((9, 3))
    plain = generate(model, prompts, max_new_tokens=30)
    stop = plain.tokens[1][7]
    expected = [row[: row.index(stop) + 1] if stop in row else row for row in plain.tokens]
    stream = generate(model, prompts, max_new_tokens=30, speculative="mtp", num_draft_tokens=2,
                      stop_tokens=stop, stream=True)
    rows: list[list[int]] = [[], []]
    for piece in stream:
        rows[piece.row] += piece.tokens
    assert rows == stream.output.tokens == expected


def test_drafter_follows_the_training_layout():
    """Catch-up and drafts of a 2-module drafter equal `mtp_hidden_states` on the same sequence."""
    model = _mtp_model(0.3, 2)
    ids = torch.tensor([_prompts((12,))[0]])
    with torch.no_grad():
        cache = KVCache.for_model(model, 1)
        h0 = model.hidden_states(ids, cache=cache)
        first = model.lm_head(h0[:, -1]).argmax(-1)
        drafter = MTPDrafter(model, 1, 3, SamplingParams(), None)
        drafter.prefill(h0, ids, None, torch.tensor([11]), first, chunk=5)
        seq = torch.cat((ids, first.unsqueeze(1)), dim=1)
        outs = model.mtp_hidden_states(model.hidden_states(seq), seq)
        for m in range(2):
            assert torch.allclose(drafter.last_h[m], outs[m][:, -1], atol=1e-5)
        drafts, _ = drafter.draft()
        assert drafts[0, 0] == model.mtp_logits(outs[0][:, -1], 1).argmax(-1)
        seq2 = torch.cat((seq, drafts[:, :1]), dim=1)
        outs2 = model.mtp_hidden_states(model.hidden_states(seq2), seq2)
        assert drafts[0, 1] == model.mtp_logits(outs2[1][:, -1], 2).argmax(-1)


def _sequence_distribution(model, prompt, new, params):
    """Exact probability of every continuation of `new` tokens (vocab^new of them), by enumeration."""
    vocab = model.config.vocab_size
    conts = torch.cartesian_prod(*[torch.arange(vocab)] * new)  # [V^new, new]
    seqs = torch.cat((torch.tensor(prompt).expand(conts.shape[0], -1), conts), dim=1)
    with torch.no_grad():
        p = probabilities(model(seqs)[:, len(prompt) - 1: -1], params)  # [V^new, new, V]
    steps = p[:, :, :].gather(-1, conts.unsqueeze(-1)).squeeze(-1)
    return steps.prod(dim=1), conts


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_speculative_sampling_keeps_the_distribution(speculative):
    """Chi-square test of 3-token continuations sampled from a vocabulary of 6 against exact enumeration."""
    model = _mtp_model(2.0, 1, vocab=6, seed=3)
    with torch.no_grad():
        model.lm_head.weight.div_(5)  # spread the distribution
    prompt, n, new = [1, 4, 2], 6000, 3
    params = SamplingParams(temperature=0.9, top_p=0.95)
    exact, conts = _sequence_distribution(model, prompt, new, params)
    out = generate(model, [prompt] * n, max_new_tokens=new, temperature=0.9, top_p=0.95, seed=0,
                   speculative=speculative, num_draft_tokens=2 if speculative else None)
    index = {tuple(c): i for i, c in enumerate(conts.tolist())}
    counts = torch.bincount(torch.tensor([index[tuple(t)] for t in out.tokens]), minlength=len(index)).double()
    expected = exact.double() * n
    assert counts[expected == 0].sum() == 0  # nothing outside top-p
    big = expected >= 5  # pool rare continuations into one cell
    obs = torch.cat((counts[big], counts[~big].sum().view(1)))
    exp = torch.cat((expected[big], expected[~big].sum().view(1)))
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    p_value = torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), chi2 / 2).item()
    assert p_value > 1e-3, (chi2.item(), dof)
    if speculative:
        assert 0.3 < out.stats.acceptance_rate < 0.9


# ---------------------------------------------------------------------------- command line
def test_generate_command_streams_the_greedy_text(tmp_path, capsys):
    import argparse

    from seekformer.commands import generate as command
    from seekformer.tokenizer import train_tokenizer

    text = "def add(a, b):\n    return a + b\n" * 20 + "class Point:\n    x: int = 0\n" * 20
    tokenizer = train_tokenizer([text], vocab_size=300)
    tokenizer.save(tmp_path)
    model = _mtp_model(0.3, 1, vocab=320)
    model.save_pretrained(tmp_path)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    base = ["--model", str(tmp_path), "--prompt", "def add", "--max-new-tokens", "12", "--temperature", "0",
            "--dtype", "fp32"]
    expected = generate(model, tokenizer.encode("def add"), max_new_tokens=12,
                        stop_tokens=[tokenizer.eos_id]).tokens[0]
    for extra in ([], ["--mtp", "--draft-tokens", "2"]):
        assert command.run(parser.parse_args(base + extra)) == 0
        out, err = capsys.readouterr()
        assert out == tokenizer.decode(expected, skip_special_tokens=True) + "\n"
        assert "tok/s decode" in err and (("MTP acceptance" in err) == bool(extra))
    with pytest.raises(ValueError, match="--draft-tokens needs --mtp"):
        command.run(parser.parse_args(base + ["--draft-tokens", "2"]))
