"""Training details: host syncs, RNG state across resume, losses against a full-logit reference,
throughput accounting, Ctrl-C, failed starts and impossible allocations."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import kill_at, step_losses, tiny_run_config

from seekformer import cli
from seekformer.training.checkpointing import latest_checkpoint
from seekformer.training.metrics import read_metrics
from seekformer.training.pretrain import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = {"progress": False, "echo": lambda _: None}
TRAINING_CODE = str(Path(__import__("seekformer.training", fromlist=["x"]).__file__).parent)
PACKAGE = str(Path(cli.__file__).parent)
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


@contextlib.contextmanager
def host_reads():
    """Record each read of a tensor's value on the host (what waits for the device) made by training
    code: (innermost seekformer function, names of the training functions on the stack)."""
    calls = []

    def spy(name, original):
        def wrapper(self, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and not frame.f_code.co_filename.startswith(PACKAGE):
                frame = frame.f_back  # torch's own frames: find who in seekformer asked
            if frame is not None and frame.f_code.co_filename.startswith(TRAINING_CODE):
                stack, f = [], frame
                while f is not None:
                    stack.append(f.f_code.co_name)
                    f = f.f_back
                calls.append((f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name} {name}", stack))
            return original(self, *args, **kwargs)
        return wrapper

    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, spy(name, original))
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_statistics_reach_the_host_only_when_logged(data_dir, tmp_path):
    cfg = tiny_run_config(data_dir, "run.steps=6", "run.log_every=3", "run.eval_every=0", "run.save_every=0",
                          "data.grad_accum=2", "balance.aux_loss_alpha=0.001")
    trainer = Trainer(cfg, tmp_path / "run", **QUIET)
    with host_reads() as calls:
        trainer.train()
    allowed = {"_log_train", "_log_val", "save", "save_final"}  # log steps, evaluation, checkpoints
    during_steps = [where for where, stack in calls if not allowed & set(stack)]
    assert during_steps == [], f"host syncs in the training steps: {sorted(set(during_steps))}"
    assert any("_log_train" in stack for _, stack in calls)  # the spy does see the logging
    train = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [3, 6]
    assert all(isinstance(r[k], float) for r in train for k in ("loss", "mtp_loss_1", "balance_loss", "grad_norm"))


def test_random_draws_after_resume_equal_the_uninterrupted_runs(data_dir, tmp_path):
    sets = ("run.steps=6", "run.log_every=1", "run.eval_every=0", "run.save_every=3")

    def draws():
        return torch.rand(4).tolist(), random.random(), float(np.random.rand())

    Trainer(tiny_run_config(data_dir, *sets), tmp_path / "a", **QUIET).train()
    straight = draws()

    interrupted = Trainer(tiny_run_config(data_dir, *sets), tmp_path / "b", **QUIET)
    kill_at(interrupted, 5)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # what a new process would have
    Trainer.resume(tmp_path / "b", **QUIET).train()
    assert step_losses(tmp_path / "b") == step_losses(tmp_path / "a")
    assert draws() == straight


def test_losses_match_a_full_logit_reference(data_dir, tmp_path):
    """Main and MTP cross-entropies and total = CE + lambda/D * sum_k CE_k, against F.cross_entropy on the
    full float64 logits; MTP depth k at position i predicts token i+k+1."""
    cfg = tiny_run_config(data_dir, "mtp.depth=2", "run.dtype='fp32'", "balance.seq_aux_alpha=0")
    trainer = Trainer(cfg, tmp_path / "run", **QUIET)
    x, y = next(trainer.sampler)
    lam = 0.3
    got, _ = trainer.losses(x, y, lam, with_mtp=True)

    model = trainer.model.double()
    with torch.no_grad():
        h = model.hidden_states(x)
        head = model.lm_head.weight
        want = {"loss": F.cross_entropy((h @ head.T).flatten(0, 1), y.flatten())}
        tokens = torch.cat([x, y[:, -1:]], dim=1)  # t_0 .. t_T
        for k, h_k in enumerate(model.mtp_hidden_states(h, x), start=1):
            logits = model.mtp_head_input(h_k, k) @ head.T  # positions i < T - k
            want[f"mtp_loss_{k}"] = F.cross_entropy(logits.flatten(0, 1), tokens[:, k + 1:].flatten())
    assert set(got) == {"loss", "mtp_loss_1", "mtp_loss_2", "total"}
    for key, value in want.items():
        assert got[key].item() == pytest.approx(value.item(), rel=1e-5), key
    total = want["loss"] + lam / 2 * (want["mtp_loss_1"] + want["mtp_loss_2"])
    assert got["total"].item() == pytest.approx(total.item(), rel=1e-5)


def test_throughput_excludes_evaluations_and_saves(data_dir, tmp_path):
    # evaluations and saves between log steps (eval at 2 and 6, save at 3, logs at 4 and 8)
    cfg = tiny_run_config(data_dir, "run.steps=8", "run.log_every=4", "run.eval_every=2", "run.save_every=3",
                          "data.eval_batches=8")
    trainer = Trainer(cfg, tmp_path / "run", **QUIET)
    step_seconds = []
    original = trainer.train_step

    def timed_step():
        start = time.perf_counter()
        out = original()
        step_seconds.append(time.perf_counter() - start)
        return out

    trainer.train_step = timed_step
    trainer.train()
    train = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    for record, seconds in zip(train, (step_seconds[:4], step_seconds[4:])):
        # at most the rate of the steps alone (the interval also holds the loop's own work)
        upper = 4 * cfg.tokens_per_step / sum(seconds)
        assert 0.5 * upper < record["tokens_per_s"] <= 1.01 * upper, (record["step"], record["tokens_per_s"], upper)


def test_ctrl_c_saves_the_step_and_says_how_to_resume(data_dir, tmp_path):
    sets = ("run.steps=6", "run.log_every=1", "run.eval_every=0", "run.save_every=0")
    Trainer(tiny_run_config(data_dir, *sets), tmp_path / "a", **QUIET).train()
    messages = []
    trainer = Trainer(tiny_run_config(data_dir, *sets), tmp_path / "b", progress=False, echo=messages.append)
    original = trainer.train_step

    def step_with_ctrl_c():
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of step 4
        return original()

    trainer.train_step = step_with_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert latest_checkpoint(tmp_path / "b").name == "step_000004"  # the step under way was finished first
    assert f"seekformer train --resume {tmp_path / 'b'}" in messages[-1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    Trainer.resume(tmp_path / "b", **QUIET).train()
    assert step_losses(tmp_path / "b") == step_losses(tmp_path / "a")


def test_impossible_batch_is_refused_in_words_and_blocks_nothing(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "train", "train")
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--no-progress", "--no-plots", "--set", f"data.dir='{data_dir}'",
            "--set", "data.seq_len=32", "--set", "run.steps=1", "--set", "run.eval_every=0"]
    assert cli.main([*args, "--set", "data.batch_size=100000000"]) == 2
    err = capsys.readouterr().err
    assert "cannot fit in memory" in err and "data.batch_size=100000000" in err, err
    assert not out.exists()
    assert cli.main([*args, "--set", "data.batch_size=2"]) == 0  # the next attempt with the same --out


ALLOCATION_FAILURE = """
import resource, sys
import torch
from seekformer import cli
torch.set_num_threads(1)
size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 700 * 2**20, resource.RLIM_INFINITY))
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc to limit the address space")
def test_allocation_failure_in_a_step_is_reported_and_the_directory_left_clean(data_dir, tmp_path):
    """A batch the up-front bound lets through but the memory cannot hold (here: a 700 MB address-space
    limit): the allocator's failure is reported in words, and --out can be used again."""
    import subprocess

    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--no-progress", "--no-plots", "--set", f"data.dir='{data_dir}'",
            "--set", "data.seq_len=32", "--set", "run.steps=1", "--set", "run.eval_every=0",
            "--set", "run.threads=1", "--set", "data.batch_size=20000"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PACKAGE.rsplit(os.sep, 1)[0], *sys.path])}
    proc = subprocess.run([sys.executable, "-c", ALLOCATION_FAILURE, *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "out of memory on the cpu device" in proc.stderr and "data.batch_size=20000" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_failed_first_step_leaves_the_directory_usable(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # a directory the user made: kept, with what it held
    trainer = Trainer(tiny_run_config(data_dir, "run.steps=2", "run.eval_every=0"), out, **QUIET)
    kill_at(trainer, 0)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    Trainer(tiny_run_config(data_dir, "run.steps=2", "run.eval_every=0"), out, **QUIET).train()


def test_memory_bound_refuses_only_the_impossible():
    """The demo's own run needs a small fraction of any machine; a million sequences per micro-batch do not fit."""
    from seekformer.config import ModelConfig
    from seekformer.training.memory import TrainingMemoryError, check_fits, training_bytes_lower_bound

    config = ModelConfig.preset("tiny-v3")
    states, activations = training_bytes_lower_bound(config, 5_000_000, 8 * 256)
    assert states == 80_000_000 and activations == 8 * 256 * (5 * 2 * 4 * 128 + 16)
    with pytest.raises(TrainingMemoryError, match="data.batch_size=1000000"):
        check_fits(config, 5_000_000, 10**6, 256, torch.device("cpu"))
