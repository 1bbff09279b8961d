"""The serving engine without HTTP: greedy parity with `generate` under continuous batching (joins
mid-flight, chunked prefill, preemption), seeded sampling independent of the batch, the sampler's
distribution and penalties against independent formulas, logprobs against a plain forward, stops,
cancellation and bad requests."""

import math
import threading

import pytest
import torch
from hf_models import LLAMA_BASE, V3_BASE

from seekformer import ModelConfig, Transformer
from seekformer.inference import generate
from seekformer.inference.sampling import SamplingParams, probabilities
from seekformer.serve import Engine, QueueFull, RequestError, RequestSampling
from seekformer.serve.sampling import SamplerInputs, apply_penalties, sample
from seekformer.tokenizer import train_tokenizer

LENGTHS = (9, 3, 40, 1, 17, 25, 60)
GREEDY = RequestSampling(max_tokens=12, temperature=0)


def _model(kind="v3", vocab=256, seed=0) -> Transformer:
    torch.manual_seed(seed)
    base = {"v3": {"model_type": "deepseek_v3", **V3_BASE}, "llama": {"model_type": "llama", **LLAMA_BASE}}[kind]
    model = Transformer(ModelConfig.from_hf({**base, "vocab_size": vocab, "eos_token_id": None})).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked logits: argmax free of near-ties
    return model


def _prompts(lengths=LENGTHS, vocab=256, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


@pytest.fixture(scope="module")
def v3():
    return _model()


def _run_all(engine, handles):
    outs = [None] * len(handles)
    while engine.has_work:
        engine.step()
    for i, h in enumerate(handles):
        outs[i] = h.result()
    return outs


@pytest.mark.parametrize("kind,cache_tokens", [("v3", 1024), ("v3", 72), ("llama", 1024)])
def test_greedy_matches_generate_alone_with_joins_mid_flight(one_thread, kind, cache_tokens):
    model = _model(kind)
    prompts = _prompts()
    alone = [generate(model, p, max_new_tokens=12, stop_tokens=[]).tokens[0] for p in prompts]
    # 3 rows, 4-token blocks, 16 tokens per step: long prompts are prefilled in chunks between decodes
    engine = Engine(model, max_batch=3, block_size=4, cache_tokens=cache_tokens, token_budget=16)
    first = [engine.submit(p, GREEDY) for p in prompts[:3]]
    for _ in range(4):
        engine.step()
    rest = [engine.submit(p, GREEDY) for p in prompts[3:]]
    outs = _run_all(engine, first + rest)
    assert [o.choices[0].token_ids for o in outs] == alone
    assert all(o.choices[0].finish_reason == "length" for o in outs)
    assert engine.pool.free_blocks == engine.pool.num_blocks  # every block returned
    assert (engine.metrics.preemptions > 0) == (cache_tokens < 100)


def test_seeded_sampling_does_not_depend_on_the_batch(one_thread, v3):
    prompts = _prompts()
    mine = RequestSampling(max_tokens=10, temperature=0.9, top_p=0.95, top_k=40, seed=123)
    others = [RequestSampling(max_tokens=n, temperature=t, seed=s) for n, t, s in ((5, 1.2, 1), (9, 0.0, None),
                                                                                  (7, 0.7, None), (3, 2.0, 4))]
    alone = Engine(v3).generate_batch([prompts[0]], mine)[0].choices[0].token_ids
    mixed = Engine(v3, max_batch=3, block_size=4, cache_tokens=96, token_budget=16).generate_batch(
        prompts[1:5] + [prompts[0]], others + [mine])
    assert mixed[-1].choices[0].token_ids == alone
    other_seed = Engine(v3).generate_batch([prompts[0]], RequestSampling(max_tokens=10, temperature=0.9,
                                                                         top_p=0.95, top_k=40, seed=124))
    assert other_seed[0].choices[0].token_ids != alone
    n3 = Engine(v3).generate_batch([prompts[0]], RequestSampling(max_tokens=10, temperature=0.9, top_p=0.95,
                                                                 top_k=40, seed=123, n=3))[0]
    assert n3.choices[0].token_ids == alone and n3.choices[1].token_ids != n3.choices[2].token_ids


def _draws(logits, params, count=40_000):
    V = logits.shape[0]
    inputs = SamplerInputs.build([params] * count, range(count), [0] * count, V, torch.device("cpu"))
    tokens = sample(logits.expand(count, V), inputs).tokens
    return torch.bincount(tokens, minlength=V).double() / count


@pytest.mark.parametrize("params", [
    RequestSampling(temperature=0.7), RequestSampling(temperature=1.3, top_k=3),
    RequestSampling(temperature=1.0, top_p=0.8), RequestSampling(temperature=1.0, top_k=4, top_p=0.9),
])
def test_sampler_draws_the_target_distribution(params):
    """Gumbel-max with hashed noise against inference.sampling.probabilities (the library's reference)."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    target = probabilities(logits.unsqueeze(0), SamplingParams(params.temperature, params.top_k or None,
                                                               params.top_p))[0].double()
    freq = _draws(logits, params)
    assert (freq[target == 0] == 0).all()
    assert (freq - target).abs().max() < 0.012  # 40k draws: std of a frequency <= 0.0025


def test_min_p_keeps_tokens_above_the_scaled_maximum():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5])
    probs = logits.double().softmax(-1)
    keep = probs >= 0.3 * probs.max()  # hand rule: p >= min_p * p_max
    target = torch.where(keep, probs, 0.0)
    target /= target.sum()
    freq = _draws(logits, RequestSampling(temperature=1.0, min_p=0.3))
    assert (freq[~keep] == 0).all() and (freq - target).abs().max() < 0.012


def test_penalties_against_the_formulas():
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0, -0.1]])
    counts = torch.tensor([[2, 0, 1, 0, 3]])
    seen = torch.tensor([[True, True, False, False, True]])
    params = RequestSampling(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5)
    inputs = SamplerInputs.build([params], [0], [0], 5, torch.device("cpu"))
    got = apply_penalties(logits, inputs, counts, seen)[0].tolist()
    expected = []
    for x, c, s in zip(logits[0].tolist(), counts[0].tolist(), seen[0].tolist()):
        x = x - 0.25 * c - (0.5 if c else 0.0)
        if s:
            x = x / 1.5 if x > 0 else x * 1.5
        expected.append(x)
    assert got == pytest.approx(expected, abs=1e-6)


def test_logprobs_match_a_plain_forward(one_thread, v3):
    prompt = _prompts()[0]
    out = Engine(v3, block_size=4).generate_batch(
        [prompt], RequestSampling(max_tokens=6, temperature=0.8, seed=3, logprobs=3, n=2))[0]
    for choice in out.choices:
        assert len(choice.logprobs) == len(choice.token_ids) == 6
        with torch.no_grad():
            logits = v3(torch.tensor([prompt + choice.token_ids]))[0, len(prompt) - 1:-1]
        logp = logits.double().log_softmax(-1)
        for i, entry in enumerate(choice.logprobs):
            assert entry.token == choice.token_ids[i]
            assert entry.logprob == pytest.approx(logp[i, entry.token].item(), abs=1e-4)
            top = logp[i].topk(3)
            assert [t for t, _ in entry.top] == top.indices.tolist()
            assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_stop_token_ids_stop_strings_and_penalties_end_cleanly(one_thread):
    corpus = ["the quick brown fox jumps over the lazy dog; naïve café déjà vu " * 30]
    tok = train_tokenizer(corpus, vocab_size=300)
    model = _model(vocab=300)
    engine = Engine(model, tok, block_size=4)
    prompt = tok.encode("the quick")
    free = engine.generate_batch([prompt], RequestSampling(max_tokens=20, temperature=0, ignore_eos=True))[0]
    tokens, text = free.choices[0].token_ids, free.choices[0].text
    assert text == tok.decode(tokens, skip_special_tokens=True)
    # a stop token: generation ends at its first occurrence, the token counted but not in the text
    stop_at = tokens[5]
    first = tokens.index(stop_at)
    out = engine.generate_batch([prompt], RequestSampling(max_tokens=20, temperature=0, ignore_eos=True,
                                                          stop_token_ids=(stop_at,)))[0].choices[0]
    assert out.token_ids == tokens[:first + 1] and out.finish_reason == "stop"
    assert out.text == tok.decode(tokens[:first], skip_special_tokens=True)
    # a stop string spanning tokens: the text ends right before it
    stop = text[len(text) // 2: len(text) // 2 + 3]
    assert stop and stop in text
    out = engine.generate_batch([prompt], RequestSampling(max_tokens=20, temperature=0, ignore_eos=True,
                                                          stop=(stop,)))[0].choices[0]
    assert out.text == text[:text.find(stop)] and out.finish_reason == "stop"
    # penalties: a strong repetition penalty removes repeats of the prompt's tokens from greedy output
    rep = engine.generate_batch([prompt], RequestSampling(max_tokens=20, temperature=0, ignore_eos=True,
                                                          frequency_penalty=2.0, presence_penalty=2.0))[0]
    counts = torch.bincount(torch.tensor(rep.choices[0].token_ids))
    assert counts.max() <= torch.bincount(torch.tensor(tokens)).max()
    assert engine.pool.free_blocks == engine.pool.num_blocks


def test_cancel_frees_blocks_at_once(one_thread, v3):
    engine = Engine(v3, block_size=4)
    handle = engine.submit(_prompts()[2], RequestSampling(max_tokens=100, temperature=0))
    keep = engine.submit(_prompts()[0], GREEDY)
    for _ in range(3):
        engine.step()
    assert engine.pool.used_blocks > 0
    handle.cancel()
    engine.step()
    assert handle.result().choices[0].finish_reason == "abort"
    assert keep.result().choices[0].finish_reason == "length"
    assert engine.pool.free_blocks == engine.pool.num_blocks


@pytest.mark.parametrize("kwargs,field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"), ({"max_tokens": 10**9}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"), ({"temperature": math.nan}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"n": 0}, "n"), ({"logprobs": 21}, "logprobs"), ({"stop": [""]}, "stop"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"max_tokens": 1.5}, "max_tokens"),
])
def test_bad_sampling_names_the_field(v3, kwargs, field):
    with pytest.raises(RequestError) as err:
        Engine(v3).submit([5, 6], RequestSampling(**kwargs))
    assert err.value.field == field


def test_bad_prompts_and_a_full_queue(v3):
    engine = Engine(v3, max_queue=2)
    for prompt in ([], [5, 300], "text", [5] * 256):
        with pytest.raises(RequestError) as err:
            engine.submit(prompt, GREEDY)
        assert err.value.field == "prompt"
    with pytest.raises(RequestError, match="context"):
        engine.submit([5] * 250, RequestSampling(max_tokens=10))
    engine.submit([5], GREEDY)
    engine.submit([6], GREEDY)
    with pytest.raises(QueueFull, match="retry"):
        engine.submit([7], GREEDY)


def test_background_thread_serves_concurrent_submitters(one_thread, v3):
    prompts = _prompts()
    alone = [generate(v3, p, max_new_tokens=12, stop_tokens=[]).tokens[0] for p in prompts]
    engine = Engine(v3, max_batch=4, block_size=4)
    engine.start()
    try:
        results = [None] * len(prompts)

        def client(i):
            results[i] = engine.submit(prompts[i], GREEDY).result().choices[0].token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.shutdown()
    assert results == alone
    text = engine.metrics.render()
    assert "seekformer_time_to_first_token_seconds_count 7" in text
    assert 'seekformer_sequences_finished_total{reason="length"} 7' in text


def test_mtp_speculation_keeps_greedy_output_per_row(one_thread):
    """Drafts from the MTP module, accepted or rejected per row, change nothing in greedy output (also
    under chunked prefill, joins and preemption); sampled rows in the same batch decode as without."""
    from test_generate import _mtp_model

    model = _mtp_model(eps=0.5, depth=1)
    prompts = _prompts()
    alone = [generate(model, p, max_new_tokens=20, stop_tokens=[]).tokens[0] for p in prompts]
    sampled = RequestSampling(max_tokens=20, temperature=0.8, seed=1)
    plain = Engine(model).generate_batch([prompts[0]], sampled)[0].choices[0].token_ids
    for cache_tokens in (1024, 92):
        engine = Engine(model, max_batch=3, block_size=4, cache_tokens=cache_tokens, token_budget=16,
                        speculative="mtp")
        greedy = RequestSampling(max_tokens=20, temperature=0)
        handles = [engine.submit(p, greedy) for p in prompts[:3]]
        for _ in range(4):
            engine.step()
        handles += [engine.submit(p, greedy) for p in prompts[3:]] + [engine.submit(prompts[0], sampled)]
        outs = [h.result().choices[0].token_ids for h in handles]
        assert outs[:-1] == alone and outs[-1] == plain
        drafted, accepted = engine.metrics.drafted, engine.metrics.accepted
        assert 0 < accepted < drafted  # both acceptances and rejections happened
        assert engine.pool.free_blocks == engine.pool.num_blocks
        assert (engine.metrics.preemptions > 0) == (cache_tokens < 100)
    with pytest.raises(ValueError, match="Multi-Token Prediction"):
        Engine(_model(), speculative="mtp")
