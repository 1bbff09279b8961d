"""Distillation: teacher traces (batched, resumable, reward-filtered) and logit distillation (forward KL)."""

from __future__ import annotations

import json

import pytest
import torch
from sft_helpers import arithmetic, make_model_dir, make_tokenizer, write_jsonl

from seekformer import cli, generate, load_model
from seekformer.training import cross_entropy, distill
from seekformer.training.chat_data import IGNORE, collate, read_chat_jsonl
from seekformer.training.cross_entropy import linear_kl_divergence
from seekformer.training.distill import generate_traces
from seekformer.training.sft import SFTConfig, SFTTrainer

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = {"progress": False, "echo": lambda _: None}


def kl_reference(h, w, th, tw, mask, temperature):
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    log_student = torch.log_softmax(h64 @ w64.T / temperature, -1)
    log_teacher = torch.log_softmax(th.double() @ tw.double().T / temperature, -1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    loss = kl[mask].mean()
    loss.backward()
    return loss, h64.grad, w64.grad


@pytest.mark.parametrize("recompute", [False, True], ids=["grads-in-forward", "recomputed"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_matches_float64_full_logits(monkeypatch, temperature, recompute):
    monkeypatch.setattr(cross_entropy, "MIN_CHUNK_ROWS", 16)
    monkeypatch.setattr(cross_entropy, "CHUNK_ELEMENTS", 16 * 50)
    if recompute:
        monkeypatch.setattr(cross_entropy, "SAVED_WEIGHT_GRAD_BYTES", 0)
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 35, 24, generator=gen).requires_grad_()
    w = (torch.randn(50, 24, generator=gen) * 0.3).requires_grad_()
    th, tw = torch.randn(2, 35, 40, generator=gen), torch.randn(50, 40, generator=gen) * 0.3
    mask = torch.rand(2, 35, generator=gen) > 0.3
    loss = linear_kl_divergence(h, w, th, tw, mask, temperature=temperature)
    (2 * loss).backward()
    want, grad_h, grad_w = kl_reference(h, w, th, tw, mask, temperature)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(h.grad.double(), 2 * grad_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), 2 * grad_w, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_kl_divergence(h, w, th, tw, mask, temperature=temperature), loss.detach())
    assert linear_kl_divergence(h, w, h.detach(), w.detach()).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="vocabularies differ.*51 rows, the student's 50"):
        linear_kl_divergence(h, w, th, torch.zeros(51, 40))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    tok = make_tokenizer()
    teacher = make_model_dir(root / "teacher", tok, 1)
    student = make_model_dir(root / "student", tok, 2, "model.num_hidden_layers=1", "model.hidden_size=48")
    return root, tok, teacher, student


def test_logit_distillation_loss_is_the_teachers_kl_on_assistant_tokens(models, tmp_path):
    root, tok, teacher_dir, student_dir = models
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic(8))
    cfg = SFTConfig()
    cfg.apply_overrides([f"model.dir='{student_dir}'", f"data.train='{data}'", f"loss.teacher='{teacher_dir}'",
                         "loss.kl_weight=0.75", "loss.temperature=1.5", "run.dtype='fp32'", "data.val_fraction=0",
                         "run.steps=10", "optim.lr=3e-3", "data.batch_size=4"])
    trainer = SFTTrainer(cfg, tmp_path / "run", **QUIET)
    batch = collate(trainer.train_examples[:4], tok.pad_id)
    out, _ = trainer.losses(batch)
    keep = batch.targets != IGNORE
    with torch.no_grad():
        student = trainer.model(batch.inputs).double() / 1.5
        teacher = load_model(teacher_dir, dtype=torch.float64)(batch.inputs) / 1.5
        log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)[keep].sum()
    torch.testing.assert_close(out["kl"].double(), kl, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["total"], 0.25 * out["ce"] + 0.75 * out["kl"])
    trainer.cfg.loss.kl_weight = 1.0  # pure distillation: the student must move towards the teacher
    assert "kl" in trainer.train().train
    with torch.no_grad():
        assert trainer.losses(batch)[0]["kl"] < 0.5 * out["kl"]


def test_logit_distillation_refuses_other_vocabularies(models, tmp_path):
    root, tok, teacher_dir, student_dir = models
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic(8))
    other = make_model_dir(tmp_path / "other", make_tokenizer(vocab_size=320))
    same_size = make_model_dir(tmp_path / "same-size", make_tokenizer(("<extra>",)))
    for teacher, message in ((other, r"vocabularies differ: .*other has 320 output ids, the student 300"),
                             (same_size, r"vocabularies differ: the tokenizer in .*same-size maps tokens")):
        cfg = SFTConfig()
        cfg.apply_overrides([f"model.dir='{student_dir}'", f"data.train='{data}'", f"loss.teacher='{teacher}'"])
        with pytest.raises(ValueError, match=message):
            SFTTrainer(cfg, tmp_path / teacher.name, **QUIET)


def prompts_file(path, n=10):
    return write_jsonl(path, [{"prompt": r["prompt"], "answer": r["answer"]} for r in arithmetic(n, seed=5)])


def test_traces_are_the_teachers_generations_as_sft_records(models, tmp_path):
    root, tok, teacher_dir, _ = models
    prompts = prompts_file(tmp_path / "prompts.jsonl", 5)
    out = tmp_path / "traces.jsonl"
    stats = generate_traces(teacher_dir, prompts, out, batch_size=2, max_new_tokens=6, temperature=0.0,
                            keep_truncated=True, think=True, progress=False)
    assert (stats.generated, stats.accepted, stats.batches) == (5, 5, 3)
    traces = read_chat_jsonl(out)  # they are SFT data as written
    model = load_model(teacher_dir)
    for record, trace in zip(read_chat_jsonl(prompts, need_assistant=False), traces):
        text = tok.apply_chat_template(record.messages, think=True)
        assert text.endswith("<think>\n")
        output = generate(model, tok.encode(text), max_new_tokens=6, stop_tokens=[tok.eos_id])
        tokens = output.tokens[0][:-1] if output.finish_reasons[0] == "stop" else output.tokens[0]
        assert trace.messages[:-1] == record.messages and trace.extra["answer"] == record.extra["answer"]
        assert trace.messages[-1] == {"role": "assistant", "content": "<think>\n" + tok.decode(tokens)}


def test_an_interrupted_run_resumes_to_the_same_file(models, tmp_path, monkeypatch):
    root, tok, teacher_dir, _ = models
    prompts = prompts_file(tmp_path / "prompts.jsonl", 7)
    settings = dict(samples=2, batch_size=3, max_new_tokens=5, temperature=1.0, seed=4, keep_truncated=True,
                    progress=False)
    generate_traces(teacher_dir, prompts, tmp_path / "straight.jsonl", **settings)
    out = tmp_path / "traces.jsonl"
    append, calls = distill._append, []

    def dies_on_third_batch(path, lines):
        calls.append(1)
        if len(calls) == 3:
            append(path, [lines[0], lines[1][:10]])  # killed in the middle of a write
            raise KeyboardInterrupt
        append(path, lines)

    monkeypatch.setattr(distill, "_append", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_traces(teacher_dir, prompts, out, **settings)
    monkeypatch.setattr(distill, "_append", append)
    stats = generate_traces(teacher_dir, prompts, out, **settings)
    assert stats.skipped_batches == 2 and stats.generated == 14 - 6
    assert out.read_text() == (tmp_path / "straight.jsonl").read_text()
    assert generate_traces(teacher_dir, prompts, out, **settings).generated == 0  # finished: nothing to do
    with pytest.raises(ValueError, match="started with other settings"):
        generate_traces(teacher_dir, prompts, out, **{**settings, "seed": 5})


def test_rejection_sampling_by_a_reward(models, tmp_path, monkeypatch):
    root, tok, teacher_dir, _ = models
    (tmp_path / "my_rewards.py").write_text(
        "def even_length(completions, answers, **info):\n"
        "    assert len(info['prompts']) == len(completions)\n"
        "    return [float(len(c) % 2 == 0) for c in completions]\n"
        "def broken(completions, answers, **info):\n"
        "    return ['yes'] * len(completions)\n"
        "def raises(completions, answers, **info):\n"
        "    raise RuntimeError('no network')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = prompts_file(tmp_path / "prompts.jsonl", 6)
    out = tmp_path / "kept.jsonl"
    stats = generate_traces(teacher_dir, prompts, out, samples=2, batch_size=4, max_new_tokens=5, temperature=1.0,
                            reward="my_rewards:even_length", keep_truncated=True, progress=False)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats.generated == 12 and stats.accepted == len(kept) and 0 < len(kept) < 12
    assert all(r["reward"] == 1.0 and len(r["messages"][-1]["content"]) % 2 == 0 for r in kept)
    for spec, message in (("my_rewards:broken", "returned 'yes' for completion 0: expected a finite number"),
                          ("my_rewards:raises", "raised RuntimeError: no network"),
                          ("my_rewards:missing", "has no callable 'missing'"),
                          ("no_such_module:f", "cannot import module 'no_such_module'")):
        with pytest.raises(ValueError, match=message):
            generate_traces(teacher_dir, prompts, tmp_path / f"{spec.split(':')[1]}.jsonl", max_new_tokens=2,
                            reward=spec, progress=False)
    # a built-in reward by its name in seekformer.training.rewards (the random teacher writes no tags: all rejected)
    stats = generate_traces(teacher_dir, prompts, tmp_path / "format.jsonl", max_new_tokens=2, reward="format",
                            keep_truncated=True, progress=False)
    assert stats.generated > 0 and stats.accepted == 0


def test_bad_input_is_named(models, tmp_path, capsys):
    root, tok, teacher_dir, _ = models
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "1+1="}, {"prompt": "1+1=" * 1100}])
    with pytest.raises(ValueError, match=r"long.jsonl:2: the prompt has \d+ tokens, which fill the teacher's context"):
        generate_traces(teacher_dir, long, tmp_path / "t.jsonl", progress=False)
    bare = make_model_dir(tmp_path / "bare", None)
    assert cli.main(["distill", "--teacher", str(bare), "--prompts", str(prompts_file(tmp_path / "p.jsonl")),
                     "--out", str(tmp_path / "t.jsonl")]) == 2
    assert "bare holds no tokenizer" in capsys.readouterr().err
    (tmp_path / "mine.jsonl").write_text("precious\n")
    with pytest.raises(ValueError, match="mine.jsonl exists but has no mine.jsonl.progress.json"):
        generate_traces(teacher_dir, prompts_file(tmp_path / "p.jsonl"), tmp_path / "mine.jsonl", progress=False)
    assert (tmp_path / "mine.jsonl").read_text() == "precious\n"  # nothing a user saved is lost


def test_cli_distill_then_sft_on_the_traces(models, tmp_path, capsys):
    root, tok, teacher_dir, student_dir = models
    traces = tmp_path / "traces.jsonl"
    assert cli.main(["distill", "--teacher", str(teacher_dir), "--prompts", str(prompts_file(tmp_path / "p.jsonl")),
                     "--out", str(traces), "--max-new-tokens", "4", "--keep-truncated", "--no-progress"]) == 0
    assert "10 of 10 new completions kept" in capsys.readouterr().out
    assert cli.main(["sft", "--model", str(student_dir), "--data", str(traces), "--out", str(tmp_path / "run"),
                     "--set", "run.steps=2", "--no-progress", "--no-plots"]) == 0
