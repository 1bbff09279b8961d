"""Golden loss curve: the first 20 steps of the tiny training run in fp32 on one thread, checked in.

Performance work on the training path (hand-written backward passes, blocked attention, the
output-head cross-entropy) must not change what the model computes; a drift shows here at once.
The corpus is synthetic (a fixed generator, not the Python standard library, which changes with
the Python version). To re-record after an intended change of numerics:
    PYTHONPATH=src python tests/test_train_golden.py
and say in the commit why the curve moved.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_TRAIN_RUN, tiny_run_config  # noqa: E402

from seekformer.data import prepare_data  # noqa: E402
from seekformer.training.metrics import read_metrics  # noqa: E402
from seekformer.training.pretrain import Trainer  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "tiny_run_fp32.json"
STEPS = 20
SETTINGS = ["run.dtype='fp32'", "run.threads=1", f"run.steps={STEPS}", "run.log_every=1", "run.eval_every=0",
            "run.save_every=0", "run.seed=0"]
KEYS = ("loss", "mtp_loss_1", "balance_loss", "grad_norm")


def synthetic_corpus(n_lines: int = 6000) -> str:
    """Python-like lines from a fixed linear congruential generator (the same text everywhere)."""
    names = ["alpha", "beta", "gamma", "delta", "value", "count", "total", "index", "result", "item"]
    ops = ["+", "-", "*", "//", "%"]
    state, lines = 12345, []

    def draw(n: int) -> int:
        nonlocal state
        state = (1103515245 * state + 12345) % 2**31
        return (state >> 8) % n

    for i in range(n_lines):
        a, b = names[draw(len(names))], names[draw(len(names))]
        kind = draw(4)
        if kind == 0:
            lines.append(f"def {a}_{draw(50)}({b}):")
        elif kind == 1:
            lines.append(f"    {a} = {b} {ops[draw(len(ops))]} {draw(100)}")
        elif kind == 2:
            lines.append(f"    return {a} {ops[draw(len(ops))]} {b}")
        else:
            lines.append(f"for {a} in range({draw(10)}):" if draw(2) else "")
        if i % 40 == 39:
            lines.append("\x00")  # document boundary, see corpus_files
    return "\n".join(lines)


def prepare_golden_data(directory: Path) -> dict:
    """The synthetic corpus as JSONL documents, tokenized with a 384-token BPE."""
    directory.mkdir(parents=True, exist_ok=True)
    docs = [d.strip("\n") for d in synthetic_corpus().split("\x00") if d.strip()]
    source = directory / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return prepare_data([source], directory / "data", vocab_size=384, val_fraction=0.05, progress=False)


def golden_run(tmp: Path) -> tuple[dict, list[dict]]:
    prepare_golden_data(tmp)
    data = tmp / "data"
    digest = hashlib.sha256((data / "train.bin").read_bytes()).hexdigest()
    threads = torch.get_num_threads()
    try:
        cfg = tiny_run_config(data, *SETTINGS)
        Trainer(cfg, tmp / "run", progress=False, echo=lambda _: None).train()
    finally:
        torch.set_num_threads(threads)
    records = [r for r in read_metrics(tmp / "run") if r["kind"] == "train"]
    return {"train_bin_sha256": digest}, [{"step": r["step"], **{k: r[k] for k in KEYS}} for r in records]


def test_tiny_run_matches_the_golden_losses(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    assert golden["overrides"] == TINY_TRAIN_RUN + SETTINGS, "the run's settings changed: re-record the curve"
    data, steps = golden_run(tmp_path)
    assert data == golden["data"], "the tokenized corpus changed (tokenizer training?), not the model"
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for got, want in zip(steps, golden["steps"]):
        for key in KEYS:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), f"step {got['step']} {key}"


if __name__ == "__main__":
    import tempfile

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data, steps = golden_run(Path(tmp))
    GOLDEN.write_text(json.dumps({"overrides": TINY_TRAIN_RUN + SETTINGS, "data": data, "steps": steps},
                                 indent=1) + "\n")
    print(f"wrote {GOLDEN}: losses {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}")
