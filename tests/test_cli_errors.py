"""Every CLI argument is checked before any work starts, and bad ones give errors that name them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from seekformer import cli
from seekformer.config import ModelConfig
from seekformer.model.transformer import Transformer


@pytest.fixture
def run_cli(monkeypatch, capsys):
    for name, module in (("demo", "demo"), ("train", "train"), ("generate", "generate"), ("data", "data"),
                         ("engram-gates", "engram_gates"), ("plot", "plot")):
        monkeypatch.setitem(cli.COMMANDS, name, module)

    def run(*args: str) -> tuple[int, str]:
        code = cli.main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.err

    return run


@pytest.fixture
def model_dir(data_dir, tmp_path) -> Path:
    """A tiny random model with the test corpus's tokenizer, in the hub layout."""
    torch.manual_seed(0)
    directory = tmp_path / "model"
    Transformer(ModelConfig.preset("tiny-v3", vocab_size=384)).save_pretrained(directory)
    shutil.copy(data_dir / "tokenizer.json", directory / "tokenizer.json")
    return directory


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    """The default corpus's cache, empty: a command that starts preparing it leaves files here."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("SEEKFORMER_CACHE", str(cache))
    return cache


def test_demo_checks_its_arguments_before_preparing_or_training(run_cli, tmp_path, empty_cache):
    code, err = run_cli("demo", "--max-new-tokens", "-3", "--out", tmp_path / "d", "--no-progress")
    assert code == 2 and "--max-new-tokens must be >= 1, got -3" in err
    code, err = run_cli("demo", "--data", tmp_path / "nope" / "x", "--out", tmp_path / "d", "--no-progress")
    assert code == 2 and f"parent directory {tmp_path / 'nope'} does not exist" in err
    code, err = run_cli("demo", "--set", "model.hidden_size=-4", "--out", tmp_path / "d", "--no-progress")
    assert code == 2 and "hidden_size" in err
    code, err = run_cli("demo", "--set", "run.device='banana'", "--out", tmp_path / "d", "--no-progress")
    assert code == 2 and "run.device" in err
    assert not empty_cache.exists() and not (tmp_path / "nope").exists() and not (tmp_path / "d").exists()


def test_train_checks_the_model_before_preparing_the_corpus(run_cli, tmp_path, empty_cache):
    code, err = run_cli("train", "--out", tmp_path / "r", "--set", "model.hidden_size=-4", "--no-progress")
    assert code == 2 and "[model]" in err and "hidden_size" in err and "-4" in err
    assert not empty_cache.exists() and not (tmp_path / "r").exists()


def test_train_config_names_what_is_valid(run_cli, tmp_path):
    code, err = run_cli("train", "--config", "tiny-v9", "--out", tmp_path / "r")
    assert code == 2 and "run config 'tiny-v9' not found" in err
    for name in ("demo", "tiny-v3", "deepseek-v3", ".toml"):
        assert name in err, name


def test_train_config_takes_a_model_preset(data_dir, run_cli, tmp_path):
    code, err = run_cli("train", "--config", "tiny-v2", "--out", tmp_path / "r", "--no-progress", "--no-plots",
                        "--set", f"data.dir='{data_dir}'", "--set", "data.seq_len=32", "--set", "data.batch_size=2",
                        "--set", "run.steps=1", "--set", "run.eval_every=0",
                        "--set", "data.eval_batches=1", "--set", "run.threads=1")
    assert code == 0, err
    saved = json.loads((tmp_path / "r" / "run_config.json").read_text())
    assert saved["model"] == {"preset": "tiny-v2"}  # no MTP and no router bias in V2: depth 0, gamma 0
    assert saved["mtp"]["depth"] == 0 and saved["balance"]["bias_update_speed"] == 0


def test_generate_checks_model_device_and_sampling_first(run_cli, model_dir, tmp_path):
    code, err = run_cli("generate", "--model", tmp_path / "nope", "--prompt", "x")
    assert code == 2 and f"--model {tmp_path / 'nope'}: no such model directory" in err
    code, err = run_cli("generate", "--model", model_dir, "--prompt", "x", "--device", "banana")
    assert code == 2 and "unknown device 'banana'" in err
    code, err = run_cli("generate", "--model", model_dir, "--prompt", "x", "--device", "cuda:99")
    assert code == 2 and "cuda:99" in err and ("no CUDA device" in err or "CUDA device(s)" in err)
    if not torch.cuda.is_available():
        code, err = run_cli("generate", "--model", model_dir, "--prompt", "x", "--device", "cuda")
        assert code == 2 and "no CUDA device is available" in err
    for args, message in ((["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
                          (["--top-p", "1.5"], "top_p must be in (0, 1]"),
                          (["--threads", "-1"], "--threads must be >= 0"),
                          (["--mtp", "--draft-tokens", "0"], "--draft-tokens must be >= 1")):
        code, err = run_cli("generate", "--model", model_dir, "--prompt", "x", *args)
        assert code == 2 and message in err, (args, err)


def test_generate_threads_option(run_cli, model_dir, capsys):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        code, err = run_cli("generate", "--model", model_dir, "--prompt", "def", "--max-new-tokens", "3",
                            "--threads", "1", "--dtype", "fp32")
        assert code == 0, err
        assert "using 1 CPU thread(s) instead of 2" in err and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_engram_gates_names_the_file_and_creates_no_directories(run_cli, model_dir, tmp_path):
    code, err = run_cli("engram-gates", "--model", model_dir, "--file", tmp_path / "missing.txt")
    assert code == 2 and f"--file {tmp_path / 'missing.txt'}: no such file" in err
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    code, err = run_cli("engram-gates", "--model", model_dir, "--file", latin1)
    assert code == 2 and f"--file {latin1} is not UTF-8 text" in err
    code, err = run_cli("engram-gates", "--model", model_dir, "--text", "x", "--out", tmp_path / "a" / "b.html")
    assert code == 2 and f"directory {tmp_path / 'a'} does not exist" in err
    assert not (tmp_path / "a").exists()
    code, err = run_cli("engram-gates", "--model", tmp_path / "nope", "--text", "x")
    assert code == 2 and "no such model directory" in err


def test_plot_names_the_malformed_line(run_cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    good = '{"kind": "train", "step": 1, "tokens": 10, "loss": 5.0}'
    (run / "metrics.jsonl").write_text(f"{good}\nloss = 4.0\n{good}\n")
    code, err = run_cli("plot", run)
    assert code == 2 and "metrics.jsonl, line 2 is not JSON" in err and "loss = 4.0" in err
    (run / "metrics.jsonl").write_text("not json at all\n")
    code, err = run_cli("plot", run)
    assert code == 2 and "line 1 is not JSON" in err
    (run / "metrics.jsonl").write_text(f'{good}\n{good[:20]}')  # a half-written last line: skipped
    code, err = run_cli("plot", run)
    assert code == 0, err


def test_data_prepare_checks_its_arguments_before_reading_the_corpus(run_cli, tmp_path, monkeypatch):
    import seekformer.data

    def no_corpus(*args, **kwargs):
        raise AssertionError("the corpus was read before the arguments were checked")

    monkeypatch.setattr(seekformer.data, "iter_documents", no_corpus)
    code, err = run_cli("data", "prepare", "--out", tmp_path / "d", "--vocab-size", "10")
    assert code == 2 and "--vocab-size must be >= 2" in err and "got 10" in err
    (tmp_path / "file").write_text("x")
    code, err = run_cli("data", "prepare", "--out", tmp_path / "file")
    assert code == 2 and "is not a directory" in err
    assert not (tmp_path / "d").exists()


def test_generate_mtp_needs_the_mtp_weights(run_cli, model_dir):
    """A model saved without its MTP layer (as transformers saves V3) cannot draft: --mtp says so at load."""
    weights = model_dir / "model.safetensors"
    state = load_file(weights)
    mtp_layer = ModelConfig.preset("tiny-v3").num_hidden_layers
    save_file({k: v for k, v in state.items() if not k.startswith(f"model.layers.{mtp_layer}.")}, weights,
              metadata={"format": "pt"})
    code, err = run_cli("generate", "--model", model_dir, "--prompt", "def", "--mtp", "--max-new-tokens", "2")
    assert code == 2 and "MTP required" in err
    code, err = run_cli("generate", "--model", model_dir, "--prompt", "def", "--max-new-tokens", "2",
                        "--dtype", "fp32", "--threads", "1")
    assert code == 0, err
