"""Data pipeline: corpora -> shards, caching, splits, samplers, errors, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seekformer.commands import data as data_cmd
from seekformer.data import (
    FORMAT,
    BatchSampler,
    PackedDataset,
    default_corpus_files,
    eval_batches,
    iter_documents,
    load_meta,
    prepare_data,
    resolve_inputs,
    token_dtype,
)
from seekformer.tokenizer import EOS_TOKEN, Tokenizer, load_tokenizer

DOCS = [f"document {i}: " + f"def f(x):\n    return x * {i}  # ünïcode 🙂\n" * (1 + i % 3) for i in range(20)]


def _corpus(root: Path, docs: list[str] = DOCS) -> Path:
    """One text file per document under root/a and root/b/c (sorted names keep doc order)."""
    for i, doc in enumerate(docs):
        sub = root / ("a" if i < len(docs) // 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"doc{i:03d}.txt"
        if not path.exists():  # keep mtimes: they are part of the cache fingerprint
            path.write_text(doc, encoding="utf-8")
    return root


def _split_docs(ds: PackedDataset, tok: Tokenizer) -> list[str]:
    text = tok.decode(np.asarray(ds.tokens))
    assert text == "" or text.endswith(EOS_TOKEN)
    return text.split(EOS_TOKEN)[:-1]


def _prepare(tmp_path: Path, **kwargs):
    corpus = _corpus(tmp_path / "corpus")
    kwargs = {"vocab_size": 300, "val_fraction": 0.2, "progress": False, **kwargs}
    return prepare_data([str(corpus / "**" / "*.txt")], tmp_path / "out", **kwargs), tmp_path / "out"


def _synthetic(root: Path, n: int, val: int = 0) -> Path:
    """A dataset whose train tokens are 0, 1, 2, ... (mod 60000): windows are easy to check."""
    root.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("val", val)):
        (np.arange(count) % 60000).astype(np.uint16).tofile(root / f"{split}.bin")
    meta = {"format": FORMAT, "vocab_size": 60000, "dtype": "uint16", "eos_id": 1,
            "tokenizer": "tokenizer.json", "splits": {"train": {"file": "train.bin", "tokens": n, "docs": 1},
                       "val": {"file": "val.bin", "tokens": val, "docs": 1}}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


# ---------------------------------------------------------------------------- prepare


def test_prepare_round_trip_and_split(tmp_path) -> None:
    meta, out = _prepare(tmp_path)
    assert not meta["cached"] and meta["dtype"] == "uint16" and meta["vocab_size"] == 300
    assert load_meta(out)["fingerprint"] == meta["fingerprint"]
    tok = load_tokenizer(out)
    train, val = PackedDataset(out, "train"), PackedDataset(out, "val")
    train_docs, val_docs = _split_docs(train, tok), _split_docs(val, tok)
    # whole documents, disjoint, nothing lost, original order kept within each split
    assert len(val_docs) == 4 and len(train_docs) == 16
    assert not set(train_docs) & set(val_docs)
    assert sorted(train_docs + val_docs) == sorted(DOCS)
    assert train_docs == [d for d in DOCS if d in train_docs]
    assert tok.decode(np.asarray(train.tokens)) == "".join(d + EOS_TOKEN for d in train_docs)
    assert meta["splits"]["train"]["tokens"] == len(train) and meta["splits"]["val"]["docs"] == 4
    # the split depends on the seed only
    _prepare(tmp_path / "again")
    assert _split_docs(PackedDataset(tmp_path / "again" / "out", "val"), tok) == val_docs
    _, out2 = _prepare(tmp_path / "seed", seed=1)
    assert _split_docs(PackedDataset(out2, "val"), load_tokenizer(out2)) != val_docs


def test_jsonl_and_glob_inputs(tmp_path) -> None:
    docs = ["first\nrecord", "second 🙂", "", "third"]
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "x.txt").write_text("from a glob")
    (tmp_path / "deep" / "y.md").write_text("not matched")
    inputs = [str(tmp_path / "data.jsonl"), str(tmp_path / "deep" / "**" / "*.txt")]
    assert resolve_inputs(inputs + [str(tmp_path / "data.jsonl")]) == [
        tmp_path / "data.jsonl", tmp_path / "deep" / "er" / "x.txt"]
    # the empty record is skipped
    assert list(iter_documents(inputs)) == ["first\nrecord", "second 🙂", "third", "from a glob"]
    assert list(iter_documents(inputs, max_docs=2)) == ["first\nrecord", "second 🙂"]
    assert list(iter_documents(inputs, max_bytes=len("first\nrecord") + 3)) == ["first\nrecord"]
    meta = prepare_data(inputs, tmp_path / "out", vocab_size=280, val_fraction=0, progress=False)
    tok = load_tokenizer(tmp_path / "out")
    expected = ["first\nrecord", "second 🙂", "third", "from a glob"]
    assert _split_docs(PackedDataset(tmp_path / "out"), tok) == expected
    assert meta["splits"]["val"] == {"file": "val.bin", "tokens": 0, "docs": 0}
    assert len(PackedDataset(tmp_path / "out", "val")) == 0


def test_caching(tmp_path) -> None:
    meta, out = _prepare(tmp_path)
    files = ["meta.json", "train.bin", "val.bin", "tokenizer.json"]
    mtimes = {f: (out / f).stat().st_mtime_ns for f in files}
    cached, _ = _prepare(tmp_path)
    assert cached["cached"] and {k: v for k, v in cached.items() if k != "cached"} == {
        k: v for k, v in meta.items() if k != "cached"}
    assert {f: (out / f).stat().st_mtime_ns for f in files} == mtimes
    # a given tokenizer, other settings, changed inputs or force rebuild
    tok_dir = tmp_path / "tok"
    load_tokenizer(out).save(tok_dir)
    with_tok, _ = _prepare(tmp_path, tokenizer=tok_dir)
    assert not with_tok["cached"] and not with_tok["tokenizer_trained"]
    assert with_tok["splits"] == meta["splits"]
    assert _prepare(tmp_path, tokenizer=tok_dir)[0]["cached"]
    assert not _prepare(tmp_path, seed=3)[0]["cached"]
    assert _prepare(tmp_path, seed=3)[0]["cached"]
    assert not _prepare(tmp_path, seed=3, force=True)[0]["cached"]
    (tmp_path / "corpus" / "a" / "doc000.txt").write_text("changed text, longer than before")
    assert not _prepare(tmp_path, seed=3)[0]["cached"]
    # a truncated shard is not a cache hit
    with open(out / "train.bin", "r+b") as fh:
        fh.truncate(10)
    assert not _prepare(tmp_path, seed=3)[0]["cached"]


def test_dtype_selection(tmp_path) -> None:
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    _, out = _prepare(tmp_path)
    tok = load_tokenizer(out)
    tok.backend.add_tokens([f"<extra_{i}>" for i in range(65536 - tok.vocab_size + 1)])
    assert tok.vocab_size == 65537
    meta = prepare_data([str(out.parent / "corpus" / "**" / "*.txt")], tmp_path / "big", tokenizer=tok,
                        val_fraction=0.2, progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 65537
    ds = PackedDataset(tmp_path / "big")
    assert ds.tokens.dtype == np.uint32 and (tmp_path / "big" / "train.bin").stat().st_size == 4 * len(ds)
    assert np.array_equal(np.asarray(ds.tokens), np.asarray(PackedDataset(out).tokens))


def test_default_corpus_slice(tmp_path) -> None:
    files = default_corpus_files()
    assert len(files) > 100 and files == default_corpus_files()
    assert not [f for f in files if {"site-packages", "test", "tests"} & set(f.parts)]
    docs = list(iter_documents(None, max_docs=4))
    assert len(docs) == 4 and docs == list(iter_documents(None, max_docs=4))
    assert docs[0] == files[0].read_text(encoding="utf-8")
    meta = prepare_data(None, tmp_path / "std", vocab_size=320, max_docs=6, val_fraction=0.2, progress=False)
    assert meta["splits"]["train"]["docs"] == 5 and meta["splits"]["val"]["docs"] == 1
    assert meta["sources"][0].startswith("python-stdlib:") and meta["sources"][1] == "pydoc_data.topics"
    assert prepare_data(None, tmp_path / "std", vocab_size=320, max_docs=6, val_fraction=0.2,
                        progress=False)["cached"]
    from pydoc_data.topics import topics

    assert topics[sorted(topics)[-1]] in list(iter_documents(None))[-3:]


def test_serial_tokenization_matches_parallel(tmp_path) -> None:
    _, out = _prepare(tmp_path)
    _, out1 = _prepare(tmp_path / "s", num_workers=1)
    assert np.array_equal(np.asarray(PackedDataset(out).tokens), np.asarray(PackedDataset(out1).tokens))


# ---------------------------------------------------------------------------- errors


def test_input_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare_data([str(tmp_path / "missing.txt")], tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match=r"nomatch/\*\*/\*\.txt"):
        prepare_data([str(tmp_path / "nomatch" / "**" / "*.txt")], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="no inputs"):
        prepare_data([], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="max_docs"):
        prepare_data(None, tmp_path / "out", max_docs=0, progress=False)
    with pytest.raises(ValueError, match="is a directory"):
        resolve_inputs([str(tmp_path)])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        prepare_data([str(tmp_path / "empty.txt")], tmp_path / "out", progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: .*'text'"):
        prepare_data([str(tmp_path / "bad.jsonl")], tmp_path / "out", progress=False)
    (tmp_path / "bad2.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad2\.jsonl:2: invalid JSON"):
        list(iter_documents([str(tmp_path / "bad2.jsonl")]))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8"):
        list(iter_documents([str(tmp_path / "latin1.txt")]))
    (tmp_path / "one.txt").write_text("only one document")
    with pytest.raises(ValueError, match="1 document"):
        prepare_data([str(tmp_path / "one.txt")], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_data([str(tmp_path / "one.txt")], tmp_path / "out", val_fraction=1.5, progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_dataset_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="meta.json"):
        PackedDataset(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="meta.json"):
        PackedDataset(tmp_path)
    root = _synthetic(tmp_path / "syn", 100, val=5)
    with pytest.raises(ValueError, match="no split 'test'"):
        PackedDataset(root, "test")
    with pytest.raises(ValueError, match=r"seq_len=8 needs at least 9"):
        eval_batches(PackedDataset(root, "val"), seq_len=8, batch_size=2).__next__()
    with pytest.raises(ValueError, match="seq_len=100"):
        BatchSampler(PackedDataset(root), seq_len=100, batch_size=2)
    with open(root / "train.bin", "r+b") as fh:
        fh.truncate(150)
    with pytest.raises(ValueError, match=r"train\.bin: 150 bytes.*100 tokens.*truncated"):
        PackedDataset(root)
    (root / "train.bin").unlink()
    with pytest.raises(FileNotFoundError, match="train.bin"):
        PackedDataset(root)


# ---------------------------------------------------------------------------- batches


def test_sampler_windows_and_epoch_tiling(tmp_path) -> None:
    ds = PackedDataset(_synthetic(tmp_path, 1000))
    T, B = 10, 7
    sampler = BatchSampler(ds, seq_len=T, batch_size=B, seed=0)
    batches = [next(sampler) for _ in range(12)]  # 84 windows: within epoch 0 (>= 90 windows)
    assert sampler.state_dict()["epoch"] == 0
    starts = []
    for x, y in batches:
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(y - x, torch.ones_like(x))  # consecutive tokens of the split
        starts += x[:, 0].tolist()
    assert len(set(starts)) == len(starts) and len({s % T for s in starts}) == 1
    again = BatchSampler(ds, seq_len=T, batch_size=B, seed=0)
    assert all(torch.equal(a[0], next(again)[0]) for a in batches)
    other = BatchSampler(ds, seq_len=T, batch_size=B, seed=1)
    assert not torch.equal(next(other)[0], batches[0][0])


def test_sampler_resume_across_epochs(tmp_path) -> None:
    ds = PackedDataset(_synthetic(tmp_path, 200))
    T, B, k = 16, 5, 7  # ~12 windows per epoch: batches straddle epochs
    full = BatchSampler(ds, T, B, seed=42)
    reference = [next(full) for _ in range(k + 10)]
    first = BatchSampler(ds, T, B, seed=42)
    for _ in range(k):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # as it would sit in a checkpoint
    assert state["step"] == k and state["epoch"] >= 2
    resumed = BatchSampler(ds, T, B, seed=42)
    resumed.load_state_dict(state)
    for x_ref, y_ref in reference[k:]:
        x, y = next(resumed)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(ds, T, B + 1, seed=42).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        BatchSampler(ds, T, B, seed=0).load_state_dict(state)


def test_sampler_ranks_partition_global_batch(tmp_path) -> None:
    ds = PackedDataset(_synthetic(tmp_path, 500))
    whole = BatchSampler(ds, 8, 6, seed=3)
    ranks = [BatchSampler(ds, 8, 3, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        x, _ = next(whole)
        assert torch.equal(x, torch.cat([next(r)[0] for r in ranks]))
    with pytest.raises(ValueError, match="rank"):
        BatchSampler(ds, 8, 3, rank=2, world_size=2)


def test_eval_batches(tmp_path) -> None:
    ds = PackedDataset(_synthetic(tmp_path, 10, val=103), "val")
    batches = list(eval_batches(ds, seq_len=10, batch_size=4))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]  # 10 windows of 10 (+1) tokens
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts == list(range(0, 100, 10))
    assert all(torch.equal(y - x, torch.ones_like(x)) for x, y in batches)
    again = list(eval_batches(ds, seq_len=10, batch_size=4, max_batches=2))
    assert len(again) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(again, batches))


def test_real_dataset_batches(tmp_path) -> None:
    _, out = _prepare(tmp_path)
    ds = PackedDataset(out)
    x, y = next(BatchSampler(ds, seq_len=16, batch_size=4, seed=0))
    assert x.shape == (4, 16) and int(x.max()) < ds.vocab_size
    tokens = torch.from_numpy(np.asarray(ds.tokens, dtype=np.int64))
    for row_x, row_y in zip(x, y):
        start = next(i for i in range(len(tokens) - 16) if torch.equal(tokens[i : i + 16], row_x))
        assert torch.equal(tokens[start + 1 : start + 17], row_y)


# ---------------------------------------------------------------------------- CLI


def test_cli_prepare(tmp_path, capsys) -> None:
    corpus = _corpus(tmp_path / "corpus")
    parser = argparse.ArgumentParser(prog="seekformer data")
    data_cmd.add_arguments(parser)
    argv = ["prepare", "--input", str(corpus / "a" / "*.txt"), str(corpus / "b/**/*.txt"),
            "--vocab-size", "300", "--val-fraction", "0.1", "--max-docs", "15", "--no-progress",
            "--out", str(tmp_path / "out")]
    assert data_cmd.run(parser.parse_args(argv)) == 0
    printed = capsys.readouterr().out
    assert "prepared dataset" in printed and "vocab 300" in printed and "train.bin" in printed
    meta = load_meta(tmp_path / "out")
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 15
    assert data_cmd.run(parser.parse_args(argv)) == 0
    assert "cached dataset" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", "--tokenizer", "x", "--vocab-size", "3", "--out", "o"])
    with pytest.raises(SystemExit):
        parser.parse_args([])


def test_cli_main_integration(tmp_path, monkeypatch, capsys) -> None:
    from seekformer import cli

    monkeypatch.setattr(cli, "COMMANDS", {"data": "data"})
    monkeypatch.setenv("RAYON_NUM_THREADS", "1")  # --num-workers sets it if unset; keep the env clean
    corpus = _corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    argv = ["data", "prepare", "--input", str(corpus / "**/*.txt"), "--vocab-size", "300", "--no-progress"]
    assert cli.main([*argv, "--num-workers", "1", "--out", str(out)]) == 0
    assert PackedDataset(out).vocab_size == 300
    assert cli.main(["data", "prepare", "--input", str(tmp_path / "nope.txt"), "--out", str(out)]) == 2
    assert "nope.txt" in capsys.readouterr().err
