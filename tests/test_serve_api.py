"""`seekformer serve` as a real subprocess on a loopback port, driven by the official `openai` client
(and raw HTTP for malformed bodies): completions, chat, streaming, n > 1, stop strings, logprobs, the
API key, every kind of bad input, a full queue, a client disconnecting mid-stream, and 16 concurrent
greedy requests that must return what each returns alone. Expected texts come from
`seekformer.inference.generate` on the same weights, decoded by the tokenizer."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from hf_models import V3_BASE

from seekformer import ModelConfig, Transformer, load_model
from seekformer.inference import generate
from seekformer.tokenizer import load_tokenizer, train_tokenizer

KEY = "test-key-123"
NAME = "tiny"
CORPUS = ["the quick brown fox jumps over the lazy dog; naïve café déjà vu " * 30]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base_url, model dir): one server for the module, fp32, one thread, 8 rows, a queue of 24."""
    directory = tmp_path_factory.mktemp("served") / NAME
    torch.manual_seed(0)
    tok = train_tokenizer(CORPUS, vocab_size=300)
    config = ModelConfig.from_hf({"model_type": "deepseek_v3", **V3_BASE, "vocab_size": 300,
                                  "eos_token_id": tok.eos_id})
    model = Transformer(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked logits: greedy choices free of near-ties
    model.save_pretrained(directory)
    tok.save(directory)
    port = _free_port()
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "seekformer.cli", "serve", "--model", str(directory), "--port", str(port),
         "--api-key", KEY, "--dtype", "fp32", "--threads", "1", "--max-batch", "8", "--max-queue", "24",
         "--block-size", "4", "--log-level", "warning"],
        env=env, stdout=(directory.parent / "server.log").open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server did not start:\n{(directory.parent / 'server.log').read_text()}")
        time.sleep(0.2)
    yield base, directory
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(served):
    """Greedy text of a prompt (token ids) from `generate` alone on the served weights."""
    directory = served[1]
    model, tok = load_model(directory), load_tokenizer(directory)

    def greedy(ids, max_new_tokens):
        out = generate(model, ids, max_new_tokens=max_new_tokens, stop_tokens=[tok.eos_id]).tokens[0]
        return tok.decode([t for t in out if t != tok.eos_id], skip_special_tokens=True), out

    return greedy, tok


def _metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(served[0] + "/health").json() == {"status": "ok"}


def test_completion_matches_generate(client, reference):
    greedy, tok = reference
    out = client.completions.create(model=NAME, prompt="the quick brown", max_tokens=12, temperature=0)
    text, tokens = greedy(tok.encode("the quick brown"), 12)
    assert out.choices[0].text == text
    assert out.usage.prompt_tokens == len(tok.encode("the quick brown"))
    assert out.usage.completion_tokens == len(tokens)
    ids = client.completions.create(model=NAME, prompt=tok.encode("the lazy"), max_tokens=5, temperature=0)
    assert ids.choices[0].text == greedy(tok.encode("the lazy"), 5)[0]


def test_chat_matches_generate_and_streams(client, reference):
    greedy, tok = reference
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "naïve café"}]
    ids = tok.encode(tok.apply_chat_template(messages))
    text, tokens = greedy(ids, 10)
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.content == text and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)


def test_completion_stream_n_and_seed(client):
    kwargs = dict(model=NAME, prompt="the quick", max_tokens=8, temperature=1.0, seed=7, n=3)
    whole = client.completions.create(**kwargs)
    assert sorted(c.index for c in whole.choices) == [0, 1, 2]
    texts = [""] * 3
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # the choices draw differently
    assert whole.usage.completion_tokens == 3 * 8 or any(c.finish_reason == "stop" for c in whole.choices)


def test_stop_strings_and_logprobs(client, reference):
    greedy, tok = reference
    text, _ = greedy(tok.encode("the quick"), 16)
    stop = text[4:7]
    out = client.completions.create(model=NAME, prompt="the quick", max_tokens=16, temperature=0, stop=[stop])
    assert out.choices[0].text == text[:text.find(stop)] and out.choices[0].finish_reason == "stop"
    lp = client.completions.create(model=NAME, prompt="the quick", max_tokens=5, temperature=0, logprobs=2)
    entry = lp.choices[0].logprobs
    assert len(entry.tokens) == len(entry.token_logprobs) == len(entry.top_logprobs) == 5
    assert all(x <= 0 for x in entry.token_logprobs)
    assert all(1 <= len(t) <= 2 for t in entry.top_logprobs)  # keyed by text: equal texts share a key
    # greedy: the chosen token is the most likely one
    assert all(max(top.values()) == pytest.approx(x, abs=1e-5) for top, x in zip(entry.top_logprobs,
                                                                                 entry.token_logprobs))
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)


def test_api_key(served):
    bad = openai.OpenAI(base_url=served[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(served[0] + "/v1/completions", json={"model": NAME, "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("body,status,param", [
    ('{"model": "tiny", "prompt": ', 400, None),  # malformed JSON
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": NAME, "prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ({"model": NAME, "prompt": 3}, 400, "prompt"),
    ({"model": NAME, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"model": NAME, "prompt": "x", "top_p": 2}, 400, "top_p"),
    ({"model": NAME, "prompt": "x", "n": 0}, 400, "n"),
    ({"model": NAME, "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ({"model": NAME, "prompt": ""}, 400, "prompt"),
    ({"model": NAME, "prompt": "the " * 400}, 400, "prompt"),  # longer than the 256-token context
    ({"model": NAME, "prompt": [5, 10**6]}, 400, "prompt"),
    ({"model": NAME}, 400, "prompt"),
])
def test_bad_completion_requests(served, body, status, param):
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(served[0] + "/v1/completions", content=data,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


@pytest.mark.parametrize("body,param", [
    ({"model": NAME, "messages": []}, "messages"),
    ({"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"model": NAME, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]},
     "messages"),
    ({"model": NAME, "messages": [{"role": "user", "content": "the " * 400}]}, "messages"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10**9},
     "max_completion_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
])
def test_bad_chat_requests(client, body, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**body)
    assert err.value.body["param"] == param


def test_full_queue_is_429_and_disconnect_frees_blocks(served, client):
    base = served[0]
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": NAME, "prompt": "the quick", "max_tokens": 200, "temperature": 1.0, "n": 20,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a discarded iterator would close the stream
        assert next(lines).startswith("data: ")  # generating: 8 sequences run, 12 wait
        with pytest.raises(openai.RateLimitError, match="queue is full"):
            client.completions.create(model=NAME, prompt="x", max_tokens=2, n=16)
    # the client went away mid-stream: its sequences and blocks are freed
    deadline = time.time() + 10
    while (_metric(base, "seekformer_cache_blocks_used") or _metric(base, "seekformer_running_sequences")
           or _metric(base, "seekformer_queue_length")) and time.time() < deadline:
        time.sleep(0.05)
    assert _metric(base, "seekformer_cache_blocks_used") == 0
    assert _metric(base, "seekformer_running_sequences") == 0
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2).choices[0].finish_reason


def test_sixteen_concurrent_greedy_requests_match_each_alone(client):
    prompts = [" ".join(["the quick brown fox", "naïve café", "déjà vu", "lazy dog"][i % 4:]) * (1 + i % 3)
               for i in range(16)]
    lengths = [4 + 3 * (i % 5) for i in range(16)]

    def ask(i):
        return client.completions.create(model=NAME, prompt=prompts[i], max_tokens=lengths[i],
                                         temperature=0).choices[0].text

    alone = [ask(i) for i in range(16)]
    together = [None] * 16

    def worker(i):
        together[i] = ask(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


def test_metrics_exposition(served):
    text = httpx.get(served[0] + "/metrics").text
    for name in ("seekformer_queue_length", "seekformer_running_sequences", "seekformer_cache_blocks_used",
                 "seekformer_generation_tokens_per_second", "seekformer_time_to_first_token_seconds_bucket",
                 "seekformer_inter_token_latency_seconds_bucket"):
        assert name in text
    assert _metric(served[0], "seekformer_time_to_first_token_seconds_count") > 16
