"""The README's commands and code run as written.

Every ```bash line and every ```python block of README.md is run, in a temporary directory, with only
the budgets a test needs added (fewer minutes and steps, a small corpus) and the README's
placeholders filled in. A command this file does not know fails the test: give it a budget in
BUDGETS when adding one to the README. Numbers the comment of an `info` command quotes must appear
in its output.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import torch

from seekformer import cli
from seekformer.config import ModelConfig
from seekformer.model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SMALL_RUN = ["--set", "data.dir='data'", "--set", "data.seq_len=32", "--set", "data.batch_size=2",
             "--set", "run.steps=2", "--set", "run.eval_every=0", "--set", "run.threads=1", "--no-progress"]
# arguments appended to each README command (argparse keeps the last value of a repeated option)
BUDGETS: dict[tuple[str, ...], list[str]] = {
    ("seekformer", "demo"): ["--minutes", "0.05", "--data", "{data}", "--max-new-tokens", "4", "--no-progress",
                             "--set", "data.seq_len=64", "--set", "data.eval_batches=2", "--set", "run.threads=1"],
    ("seekformer", "info"): [],
    ("seekformer", "data", "prepare"): ["--max-bytes", "200000", "--vocab-size", "384", "--no-progress"],
    ("seekformer", "train"): SMALL_RUN,
    ("seekformer", "plot"): [],
    ("seekformer", "generate"): ["--max-new-tokens", "4", "--threads", "1"],
    ("seekformer", "engram-gates"): [],
    ("seekformer", "demo", "--r1"): ["--minutes", "0.2", "--no-progress", "--set", "run.steps=1",
                                     "--set", "grpo.prompts_per_step=2", "--set", "grpo.group_size=2",
                                     "--set", "grpo.max_new_tokens=4", "--set", "grpo.eval_size=2",
                                     "--set", "run.threads=1"],
    ("seekformer", "sft"): ["--set", "run.steps=2", "--set", "data.batch_size=2", "--set", "run.threads=1",
                            "--no-progress", "--no-plots"],
    ("seekformer", "distill"): ["--max-new-tokens", "4", "--batch-size", "2", "--no-progress"],
    ("seekformer", "grpo"): ["--set", "run.steps=1", "--set", "grpo.prompts_per_step=2", "--set", "grpo.group_size=2",
                             "--set", "grpo.max_new_tokens=4", "--set", "grpo.eval_size=2", "--set", "run.threads=1",
                             "--no-progress", "--no-plots"],
    ("seekformer", "quantize"): [],
}
PLACEHOLDERS = {"DIR": "runs/e/final"}  # engram-gates --model DIR: the Engram run trained just before
# the data files the README's post-training commands name
DATA_FILES = {
    "chats.jsonl": [{"messages": [{"role": "user", "content": "What is 2+3?"},
                                  {"role": "assistant", "content": "<think>2+3=5</think><answer>5</answer>"}]},
                    {"prompt": "What is 4+4?", "completion": "<answer>8</answer>"}] * 4,
    "prompts.jsonl": [{"prompt": "What is 1+2?", "answer": "3"}, {"prompt": "What is 7+1?", "answer": "8"}],
}
MAKE_TARGETS = ("demo", "test")  # dry run only: the demo runs below, and the suite cannot run itself


def fenced(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def readme_commands() -> list[tuple[list[str], str]]:
    """(argv, comment) of each command line of the ```bash blocks."""
    out = []
    for block in fenced("bash"):
        for line in block.splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                comment = line.split(" #", 1)[1] if " #" in line else ""
                out.append((argv, comment))
    return out


def budget(argv: list[str]) -> list[str] | None:
    for prefix in sorted(BUDGETS, key=len, reverse=True):
        if tuple(argv[: len(prefix)]) == prefix:
            return BUDGETS[prefix]
    return None


def test_readme_commands_run_as_written(data_dir, tmp_path, monkeypatch, capsys):
    commands = readme_commands()
    assert any(argv[0] == "seekformer" for argv, _ in commands)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    for name, records in DATA_FILES.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    threads = torch.get_num_threads()
    try:
        for argv, _ in commands:
            if argv[0] == "make":
                assert len(argv) == 2 and argv[1] in MAKE_TARGETS, f"unknown README command: {argv}"
                dry = subprocess.run(["make", "-n", argv[1]], cwd=ROOT, capture_output=True, text=True)
                assert dry.returncode == 0, dry.stderr
                continue
            assert argv[0] == "seekformer", f"unknown README command: {argv}"
            extra = budget(argv)
            assert extra is not None, f"README command without a budget in tests/test_readme.py: {argv}"
            args = [PLACEHOLDERS.get(a, a) for a in argv[1:]] + [a.format(data=data_dir) for a in extra]
            code = cli.main(args)
            out = capsys.readouterr()
            assert code == 0, f"{shlex.join(argv)} failed:\n{out.err[-3000:]}"
    finally:
        torch.set_num_threads(threads)


def test_readme_numbers_are_what_the_commands_print(capsys):
    """Numbers a command's README comment quotes appear in its output (commands that need no run)."""
    checked = 0
    for argv, comment in readme_commands():
        numbers = re.findall(r"\d[\d,.]*\d", comment)
        if argv[:2] != ["seekformer", "info"] or not numbers:
            continue
        assert cli.main(argv[1:]) == 0
        out = capsys.readouterr().out
        for number in numbers:
            assert number in out, f"{shlex.join(argv)}: the README says {number}, the output:\n{out}"
        checked += 1
    assert checked


def test_readme_python_runs_as_written(data_dir, tmp_path, monkeypatch):
    """The Quickstart with `path/to/hf_dir` a tiny V3 model (with MTP) and the test corpus's tokenizer."""
    torch.manual_seed(0)
    model_dir = tmp_path / "hf_dir"
    Transformer(ModelConfig.preset("tiny-v3", vocab_size=384)).save_pretrained(model_dir)
    shutil.copy(data_dir / "tokenizer.json", model_dir / "tokenizer.json")
    monkeypatch.chdir(tmp_path)
    blocks = fenced("python")
    assert blocks
    for block in blocks:
        code = block.replace("path/to/hf_dir", str(model_dir)).replace("path/to/config.json",
                                                                         str(model_dir / "config.json"))
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert (tmp_path / "out_dir" / "config.json").is_file()
