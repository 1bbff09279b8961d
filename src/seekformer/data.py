"""Corpora -> packed token shards, and batches for training and evaluation.

`prepare_data` writes into one directory:
  tokenizer.json (+ tokenizer_config.json)  the tokenizer the shards were made with
  train.bin, val.bin   flat arrays of token ids (uint16 when the vocabulary fits, else uint32);
                       every document is followed by EOS
  meta.json            vocab size, dtype, token/document counts, sources, settings, fingerprint
Documents are split between train and val as whole documents by a seeded draw.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import sys
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from seekformer.io_utils import atomic_write, atomic_write_text
from seekformer.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer, train_tokenizer

FORMAT = "seekformer-packed-v1"
META_FILE = "meta.json"
SPLITS = ("train", "val")
DEFAULT_CORPUS = "python-stdlib"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_CHUNK_DOCS, _CHUNK_BYTES = 1024, 8 << 20  # documents per encode_batch call


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------- corpus


def resolve_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand file paths and recursive glob patterns (`docs/**/*.txt`) into a list of files.

    Glob matches are sorted; a file named twice is kept once, at its first position."""
    files: list[Path] = []
    for item in inputs:
        text = str(item)
        if Path(text).is_file():
            matches = [text]
        elif Path(text).is_dir():
            raise ValueError(f"input {text!r} is a directory; pass files or a glob such as '{text}/**/*.txt'")
        elif glob.has_magic(text):
            matches = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"input glob {text!r} matches no files")
        else:
            raise FileNotFoundError(f"input file not found: {text}")
        files.extend(Path(m) for m in matches)
    return list(dict.fromkeys(files))


def _read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from exc


def _read_jsonl(path: Path) -> Iterator[str]:
    """The `text` field of each line; blank lines are skipped."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a string field 'text'")
            yield record["text"]


def read_documents(files: Iterable[Path]) -> Iterator[str]:
    """Documents of `files`: a `.jsonl` file gives one per line, any other file is one document."""
    for path in files:
        if path.suffix == ".jsonl":
            yield from _read_jsonl(path)
        else:
            yield _read_text_file(path)


def default_corpus_files() -> list[Path]:
    """The standard library's own `.py` files, sorted, without site-packages and test directories."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _pydoc_topics() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it; the corpus is then stdlib source only
        return []
    return [topics[k] for k in sorted(topics)]


def default_corpus() -> Iterator[str]:
    """Python sources of the stdlib (in the encoding their header declares), then the pydoc topics."""
    for path in default_corpus_files():
        raw = path.read_bytes()
        try:
            encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        except SyntaxError:
            encoding = "utf-8"
        # a few stdlib files hold deliberately odd bytes; replace them rather than fail the demo
        yield raw.decode(encoding, errors="replace")
    yield from _pydoc_topics()


def iter_documents(
    inputs: Sequence[str | Path] | None, max_docs: int | None = None, max_bytes: int | None = None
) -> Iterator[str]:
    """Non-empty documents of `inputs` (the default corpus when None), in order, within the caps.

    `max_bytes` stops before the first document that would push the UTF-8 total past it."""
    docs = default_corpus() if inputs is None else read_documents(resolve_inputs(inputs))
    count = total = 0
    for doc in docs:
        if not doc:
            continue
        if max_docs is not None and count >= max_docs:
            return
        if max_bytes is not None:
            total += len(doc.encode("utf-8"))
            if total > max_bytes:
                return
        count += 1
        yield doc


def _describe_sources(inputs: Sequence[str | Path] | None) -> tuple[list[str], list[Any]]:
    """(source names for meta.json, stat entries that change when an input changes)."""
    if inputs is None:
        files = default_corpus_files()
        stdlib = sysconfig.get_paths()["stdlib"]
        names = [f"{DEFAULT_CORPUS}:{stdlib} ({len(files)} files)"]
        names += ["pydoc_data.topics"] if _pydoc_topics() else []
        extra: list[Any] = [sys.version]
    else:
        files = resolve_inputs(inputs)
        names, extra = [str(f) for f in files], []
    stats = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return names, stats + extra


# ---------------------------------------------------------------------------- prepare


def _val_mask(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out documents: max(1, round(val_fraction * n)) of them when fraction > 0."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n_docs))
    if n_val >= n_docs:
        raise ValueError(
            f"the corpus has {n_docs} document(s): too few to hold out {n_val} for validation "
            "and keep one for training (add documents or pass val_fraction=0)"
        )
    mask = np.zeros(n_docs, dtype=bool)
    mask[np.random.default_rng([seed, 0x5EED]).choice(n_docs, size=n_val, replace=False)] = True
    return mask


def _chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if len(chunk) >= _CHUNK_DOCS or size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _write_shards(
    docs: Iterable[str], is_val: np.ndarray, tok: Tokenizer, dtype: np.dtype, out_dir: Path,
    total_bytes: int, num_workers: int | None, progress: bool,
) -> dict[str, dict[str, int]]:
    """Tokenize `docs` chunk by chunk, append EOS, stream ids into train.bin / val.bin atomically."""
    counts = {s: {"tokens": 0, "docs": 0} for s in SPLITS}
    eos = np.array([tok.eos_id], dtype=dtype)

    def write(train_tmp: Path, val_tmp: Path) -> None:
        index = 0
        with open(train_tmp, "wb") as f_train, open(val_tmp, "wb") as f_val, tqdm(
            total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress
        ) as bar:
            for chunk in _chunks(docs):
                if num_workers == 1:
                    ids = [tok.encode(d) for d in chunk]
                else:
                    ids = tok.encode_batch(chunk)
                parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
                for doc_ids in ids:
                    split = "val" if is_val[index] else "train"
                    parts[split] += [np.asarray(doc_ids, dtype=dtype), eos]
                    counts[split]["docs"] += 1
                    index += 1
                for split, fh in (("train", f_train), ("val", f_val)):
                    if parts[split]:
                        arr = np.concatenate(parts[split])
                        arr.tofile(fh)
                        counts[split]["tokens"] += int(arr.size)
                bar.update(sum(len(d.encode("utf-8")) for d in chunk))

    atomic_write(out_dir / "train.bin", lambda t: atomic_write(out_dir / "val.bin", lambda v: write(t, v)))
    return counts


def _fingerprint(settings: dict[str, Any], stats: list[Any]) -> str:
    blob = json.dumps({"format": FORMAT, "settings": settings, "inputs": stats}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _cached(out_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """meta.json of a complete dataset in out_dir made with the same fingerprint, else None."""
    try:
        meta = load_meta(out_dir)
    except (FileNotFoundError, ValueError):
        return None
    try:
        if meta.get("fingerprint") != fingerprint or not (out_dir / meta["tokenizer"]).is_file():
            return None
        for split in SPLITS:
            info = meta["splits"][split]
            path = out_dir / info["file"]
            if not path.is_file() or path.stat().st_size != info["tokens"] * np.dtype(meta["dtype"]).itemsize:
                return None
    except (KeyError, TypeError):
        return None
    return meta


def prepare_data(
    inputs: Sequence[str | Path] | None,
    out_dir: str | Path,
    tokenizer: Tokenizer | str | Path | None = None,
    vocab_size: int = 8192,
    val_fraction: float = 0.01,
    seed: int = 0,
    max_docs: int | None = None,
    max_bytes: int | None = None,
    num_workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize a corpus into `out_dir` (see module doc) and return its meta dict.

    inputs: text files, JSONL files (`text` field per line) and globs; None = the default corpus.
    tokenizer: a Tokenizer, or a path to one (dir or tokenizer.json); None trains a byte-level BPE
      of `vocab_size` on the corpus. num_workers: 1 tokenizes in this thread; otherwise tokenizers'
      Rust thread pool is used (its size is set per process by RAYON_NUM_THREADS).
    If `out_dir` already holds a complete dataset made from the same inputs (same sizes and mtimes)
    and settings, it is returned as is (`meta["cached"]` is True) unless `force`."""
    out_dir = Path(out_dir)
    if inputs is not None and len(inputs) == 0:
        raise ValueError("no inputs given (pass None for the default corpus)")
    for name, value in (("max_docs", max_docs), ("max_bytes", max_bytes), ("num_workers", num_workers)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    sources, stats = _describe_sources(inputs)
    tok_hash = None if tokenizer is None else hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()
    settings = {
        "tokenizer": tok_hash,
        "vocab_size": vocab_size if tokenizer is None else None,
        "val_fraction": val_fraction, "seed": seed, "max_docs": max_docs, "max_bytes": max_bytes,
    }
    fingerprint = _fingerprint(settings, stats)
    if not force and (meta := _cached(out_dir, fingerprint)) is not None:
        return {**meta, "cached": True}

    def docs() -> Iterator[str]:
        return iter_documents(inputs, max_docs=max_docs, max_bytes=max_bytes)

    n_docs = total_bytes = 0
    for doc in docs():  # pass 1: validate every input, count
        n_docs += 1
        total_bytes += len(doc.encode("utf-8"))
    if n_docs == 0:
        raise ValueError(f"empty corpus: no non-empty documents in {sources}")
    is_val = _val_mask(n_docs, val_fraction, seed)
    if tokenizer is None:
        tokenizer = train_tokenizer(docs(), vocab_size, show_progress=progress)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)  # the directory is incomplete until meta.json is back
    tokenizer.save(out_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    counts = _write_shards(docs(), is_val, tokenizer, dtype, out_dir, total_bytes, num_workers, progress)
    meta = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_trained": settings["tokenizer"] is None,
        "splits": {s: {"file": f"{s}.bin", **counts[s]} for s in SPLITS},
        "bytes": total_bytes,
        "sources": sources,
        "settings": settings,
    }
    atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    return {**meta, "cached": False}


# ---------------------------------------------------------------------------- reading


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """meta.json of a prepared dataset, checked for the fields readers need."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{data_dir}: no {META_FILE}; prepare the dataset first: seekformer data prepare --out {data_dir}"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a seekformer dataset (expected format {FORMAT!r})")
    missing = [k for k in ("vocab_size", "dtype", "splits", "tokenizer", "eos_id") if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing fields {missing}")
    return meta


class PackedDataset:
    """One split of a prepared dataset as a read-only memory map of token ids."""

    def __init__(self, data_dir: str | Path, split: str = "train") -> None:
        self.data_dir = Path(data_dir)
        self.meta = load_meta(data_dir)
        if split not in self.meta["splits"]:
            raise ValueError(f"{data_dir}: no split {split!r}; available: {sorted(self.meta['splits'])}")
        self.split = split
        info = self.meta["splits"][split]
        self.path = self.data_dir / info["file"]
        self.dtype = np.dtype(self.meta["dtype"])
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: shard listed in meta.json is missing")
        expected, actual = info["tokens"] * self.dtype.itemsize, self.path.stat().st_size
        if actual != expected:
            raise ValueError(
                f"{self.path}: {actual} bytes, but meta.json says {info['tokens']} tokens of "
                f"{self.dtype.name} = {expected} bytes (truncated or overwritten?)"
            )
        self.tokens: np.ndarray = (
            np.memmap(self.path, dtype=self.dtype, mode="r", shape=(info["tokens"],))
            if info["tokens"] else np.zeros(0, dtype=self.dtype)
        )

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    def check_seq_len(self, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if len(self) < seq_len + 1:
            raise ValueError(
                f"{self.path}: split {self.split!r} has {len(self)} tokens; seq_len={seq_len} needs at "
                f"least {seq_len + 1}"
            )

    def windows(self, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) int64 [len(starts), seq_len] from windows of seq_len+1 tokens."""
        block = np.array(self.tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)  # [B, T+1]
        block = torch.from_numpy(block)
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()


class BatchSampler:
    """Endless, deterministic, resumable random batches of training windows.

    Each epoch draws a random phase in [0, seq_len) and a seeded permutation of the windows that
    start at phase + k*seq_len (they tile the split, so each token is a target once per epoch).
    The stream of windows runs across epochs without dropping any. With `world_size > 1`, rank r
    gets rows [r*B, (r+1)*B) of each global batch. `state_dict()` after k batches, loaded into a
    fresh sampler, continues with batch k+1 of the same run."""

    def __init__(
        self, dataset: PackedDataset, seq_len: int, batch_size: int, seed: int = 0,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        dataset.check_seq_len(seq_len)
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size; got {batch_size=}, {rank=}, {world_size=}"
            )
        self.dataset, self.seq_len, self.batch_size, self.seed = dataset, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = self.offset = self.step = 0
        self._starts: tuple[int, np.ndarray] | None = None  # (epoch, window starts)

    def _epoch_starts(self) -> np.ndarray:
        if self._starts is None or self._starts[0] != self.epoch:
            n, t = len(self.dataset), self.seq_len
            rng = np.random.default_rng([self.seed, 1, self.epoch])
            phase = int(rng.integers(0, min(t, n - t)))  # keeps at least one full window
            count = (n - 1 - phase) // t
            self._starts = (self.epoch, phase + t * rng.permutation(count))
        return self._starts[1]

    def _take(self, count: int) -> np.ndarray:
        out = []
        while count:
            starts = self._epoch_starts()
            k = min(count, len(starts) - self.offset)
            out.append(starts[self.offset : self.offset + k])
            self.offset += k
            count -= k
            if self.offset == len(starts):
                self.epoch, self.offset = self.epoch + 1, 0
        return np.concatenate(out)

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self._take(self.batch_size * self.world_size)
        self.step += 1
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return self.dataset.windows(mine, self.seq_len)

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch, "offset": self.offset, "step": self.step, "seed": self.seed,
            "seq_len": self.seq_len, "batch_size": self.batch_size, "world_size": self.world_size,
            "num_tokens": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_len", "batch_size", "world_size", "num_tokens"):
            if int(state.get(key, -1)) != mine[key]:
                raise ValueError(
                    f"sampler state does not match this sampler: {key}={state.get(key)!r} in the state, "
                    f"{mine[key]} here"
                )
        self.epoch, self.offset, self.step = int(state["epoch"]), int(state["offset"]), int(state["step"])


def eval_batches(
    dataset: PackedDataset, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) over consecutive windows starting at 0, seq_len, 2*seq_len, ...

    The last batch may be smaller; stops after `max_batches` when given."""
    dataset.check_seq_len(seq_len)
    starts = np.arange((len(dataset) - 1) // seq_len) * seq_len
    n_batches = math.ceil(len(starts) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        yield dataset.windows(starts[b * batch_size : (b + 1) * batch_size], seq_len)
