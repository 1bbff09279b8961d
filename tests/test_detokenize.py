"""IncrementalDetokenizer: pieces add up to tokenizer.decode of the whole sequence (the oracle), multi-byte
characters split over tokens never surface as U+FFFD, and stop strings spanning tokens cut the text."""

import random

import pytest

from seekformer.inference.detokenize import IncrementalDetokenizer
from seekformer.tokenizer import EOS_TOKEN, train_tokenizer

CORPUS = ["naïve café — déjà vu 日本語のテキスト 🙂🚀 emoji and plain ascii words " * 20,
          "the quick brown fox jumps over the lazy dog " * 20]
TEXTS = ["héllo wörld — ünïcödé", "日本語のテキストです", "mixed 🙂 emoji 🚀 and ascii", "plain text only",
         "ZWJ family 👨‍👩‍👧 done"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


def _feed(detok, ids, rng):
    """Push ids in random-sized groups; return the pieces."""
    pieces, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        pieces.append(detok.push(ids[i:i + n]))
        i += n
    pieces.append(detok.flush())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_add_up_to_the_full_decode(tok, text):
    ids = tok.encode(text)
    assert any(tok.decode_token(i) == "\ufffd" for i in ids) or text.isascii()  # some tokens split a character
    for seed in range(3):
        pieces = _feed(IncrementalDetokenizer(tok), ids, random.Random(seed))
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
        assert not any("\ufffd" in p for p in pieces)


def test_one_token_at_a_time_and_special_tokens(tok):
    ids = tok.encode("déjà vu") + [tok.eos_id] + tok.encode(" 🙂")
    detok = IncrementalDetokenizer(tok)
    out = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert out == tok.decode(ids, skip_special_tokens=True)
    keep = IncrementalDetokenizer(tok, skip_special_tokens=False)
    out = "".join(keep.push([i]) for i in ids) + keep.flush()
    assert out == tok.decode(ids) and EOS_TOKEN in out


def test_window_stays_short(tok):
    """O(1) per token: the decode window never holds more than a few tokens."""
    ids = tok.encode(" ".join(TEXTS) * 10)
    detok = IncrementalDetokenizer(tok)
    longest = 0
    for i in ids:
        detok.push([i])
        longest = max(longest, len(detok.ids) - detok._context)
    assert longest <= 8


def test_invalid_utf8_is_released_eventually(tok):
    """A lone continuation byte is a real U+FFFD: released after a few tokens, not held forever."""
    lone = next(i for i in range(tok.vocab_size) if tok.decode_token(i) == "\ufffd")
    ids = [lone] + tok.encode(" and then plenty of ascii text follows here")
    detok = IncrementalDetokenizer(tok)
    out = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert out == tok.decode(ids)


@pytest.mark.parametrize("stop", [["vu 日"], ["🚀"], ["quick brown", "zzz"], ["x"], ["é"]])
def test_stop_strings_spanning_tokens(tok, stop):
    text = "naïve café déjà vu 日本 the quick brown fox 🙂🚀 box"
    ids = tok.encode(text)
    first = min(text.find(s) for s in stop if s in text)
    for seed in range(3):
        detok = IncrementalDetokenizer(tok, stop=stop)
        pieces = _feed(detok, ids, random.Random(seed))
        assert "".join(pieces) == text[:first]
        assert detok.stopped in stop
        assert detok.push(tok.encode("more")) == ""


def test_stop_prefix_that_does_not_complete_is_released(tok):
    text = "the quick brown fox"
    detok = IncrementalDetokenizer(tok, stop=["quick red"])
    out = "".join(detok.push([i]) for i in tok.encode(text)) + detok.flush()
    assert out == text and detok.stopped is None
