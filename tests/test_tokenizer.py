"""Tokenizer: training, exact round trips, special tokens, files, chat format."""

from __future__ import annotations

import json

import pytest

from seekformer.tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    THINK_END,
    THINK_START,
    USER_TOKEN,
    Tokenizer,
    format_chat,
    load_tokenizer,
    train_tokenizer,
)

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "Ünïcödé tëxt, 中文字符, emoji 🙂🚀 and tabs\tand\r\nCRLF lines.\n",
    "class Point:\n    x: int\n    y: int\n\n    def norm(self) -> float:\n"
    "        return (self.x ** 2) ** 0.5\n",
] * 4

SAMPLES = [
    "",
    "hello world",
    "  leading and trailing spaces   ",
    "\n\nnewlines\n\n\n",
    "tabs\tand\r\nwindows line ends\r\n",
    "Ünïcödé, 中文, العربية, emoji 🙂🚀👩‍👩‍👧, combining é",
    "unseen bytes: \x00\x01\x7f \u2028 \ufeff",
    f"text with {USER_TOKEN} markers {THINK_START}inside{THINK_END} and {EOS_TOKEN} ends",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_bos=True)) == BOS_TOKEN + text


def test_special_token_ids(tok: Tokenizer) -> None:
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.encode(USER_TOKEN + ASSISTANT_TOKEN + THINK_START + THINK_END) == [3, 4, 5, 6]
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_id
    text = f"{USER_TOKEN}q{ASSISTANT_TOKEN}{THINK_START}r{THINK_END}a{EOS_TOKEN}{PAD_TOKEN}"
    ids = tok.encode(text, add_bos=True)
    # <think> tags are not "special": reward functions see them in skip_special_tokens output
    assert tok.decode(ids, skip_special_tokens=True) == f"q{THINK_START}r{THINK_END}a"


def test_vocab_size_and_training_determinism(tok: Tokenizer) -> None:
    assert tok.vocab_size == len(tok) == 300
    again = train_tokenizer(CORPUS, vocab_size=300)
    assert again.backend.to_str() == tok.backend.to_str()


def test_encode_batch_and_decode_token(tok: Tokenizer) -> None:
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]
    assert tok.encode_batch(SAMPLES, add_bos=True) == [tok.encode(s, add_bos=True) for s in SAMPLES]
    text = "plain ascii text, decoded token by token\n"
    assert "".join(tok.decode_token(i) for i in tok.encode(text)) == text
    assert tok.decode_token(tok.eos_id) == EOS_TOKEN
    # a token holding half of a multi-byte character has no text of its own
    partial = [i for i in tok.encode("🚀") if tok.decode_token(i) == "\ufffd"]
    assert partial


def test_decode_accepts_arrays(tok: Tokenizer) -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    ids = tok.encode("array input")
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "array input"
    assert tok.decode(torch.tensor(ids)) == "array input"


def test_save_load_round_trip(tok: Tokenizer, tmp_path) -> None:
    path = tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert [config[f"{k}_token"] for k in ("bos", "eos", "pad")] == [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]
    assert config["chat_template"] == tok.chat_template
    for source in (tmp_path / "tok", path, str(path)):
        loaded = load_tokenizer(source)
        assert loaded.vocab_size == tok.vocab_size
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
        for text in SAMPLES:
            assert loaded.encode(text) == tok.encode(text)
    assert not [p for p in (tmp_path / "tok").iterdir() if p.name.endswith(".tmp")]


def test_load_errors(tok: Tokenizer, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match="bad.json"):
        load_tokenizer(bad)
    tok.save(tmp_path / "cfg")
    (tmp_path / "cfg" / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path / "cfg")
    (tmp_path / "cfg" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ValueError, match="<s>"):
        load_tokenizer(tmp_path / "cfg")


def test_train_errors() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="special_tokens"):
        train_tokenizer(CORPUS, vocab_size=400, special_tokens=[BOS_TOKEN, EOS_TOKEN])


def test_chat_format(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "2+2?"},
    ]
    expected = f"{BOS_TOKEN}Be brief.{USER_TOKEN}1+1?{ASSISTANT_TOKEN}2{EOS_TOKEN}{USER_TOKEN}2+2?"
    assert tok.apply_chat_template(messages) == expected + ASSISTANT_TOKEN
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert tok.apply_chat_template(messages, think=True) == expected + ASSISTANT_TOKEN + THINK_START + "\n"
    ids = tok.encode(tok.apply_chat_template(messages))
    assert ids[0] == tok.bos_id and ids[-1] == tok.token_to_id(ASSISTANT_TOKEN)
    with pytest.raises(ValueError, match=r"messages\[0\].*role"):
        format_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[1\].*system"):
        format_chat([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])
    with pytest.raises(ValueError, match=r"messages\[0\].*content"):
        format_chat([{"role": "user"}])


def test_transformers_loads_saved_tokenizer(tok: Tokenizer, tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    tok.save(tmp_path)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for text in SAMPLES[1:]:
        assert fast.encode(text, add_special_tokens=False) == tok.encode(text)
        assert auto.encode(text, add_special_tokens=False) == tok.encode(text)
        assert auto(text)["input_ids"] == tok.encode(text, add_bos=True)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}]
    for kwargs in ({}, {"think": True}, {"add_generation_prompt": False}):
        hf_kwargs = {"add_generation_prompt": True, **kwargs}
        assert auto.apply_chat_template(messages, tokenize=False, **hf_kwargs) == tok.apply_chat_template(
            messages, **hf_kwargs
        )
