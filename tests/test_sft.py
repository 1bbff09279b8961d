"""Supervised fine-tuning from a model directory: masked loss against float64, packing, exact resume,
freezing, run artefacts, starting from transformers' weights, errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import kill_at
from safetensors.torch import load_file
from sft_helpers import arithmetic, make_model_dir, make_tokenizer, write_jsonl

from seekformer import cli, load_model
from seekformer.training.chat_data import collate, pack
from seekformer.training.checkpointing import latest_checkpoint
from seekformer.training.metrics import read_metrics
from seekformer.training.optim import lr_factor
from seekformer.training.run_config import ScheduleSection
from seekformer.training.sft import SFTConfig, SFTTrainer

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = {"progress": False, "echo": lambda _: None}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    tok = make_tokenizer()
    model_dir = make_model_dir(root / "model", tok)
    data = write_jsonl(root / "train.jsonl", arithmetic(64))
    return root, tok, model_dir, data


def config(model_dir, data, *overrides) -> SFTConfig:
    cfg = SFTConfig()
    cfg.apply_overrides([f"model.dir='{model_dir}'", f"data.train='{data}'", "data.batch_size=4", "run.dtype='fp32'",
                         "optim.lr=3e-3", "data.val_fraction=0.125", *overrides])
    return cfg


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_masked_loss_and_gradients_equal_a_float64_full_logit_reference(setup, tmp_path):
    root, tok, model_dir, data = setup
    trainer = SFTTrainer(config(model_dir, data), tmp_path / "run", **QUIET)
    examples = trainer.train_examples[:5]
    batch = collate(examples, tok.pad_id)
    out, _ = trainer.losses(batch)
    (out["total"] / batch.n_targets).backward()
    got = grads(trainer.model)

    reference = copy.deepcopy(trainer.model).double()
    reference.zero_grad(set_to_none=True)
    losses = []
    for ex in examples:  # one unpadded sequence at a time; what is prompt is found independently
        record = next(r for r in arithmetic(64) if tok.encode(tok.apply_chat_template(
            [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
            add_generation_prompt=False)) == ex.ids.tolist())
        n_prompt = len(tok.encode(tok.apply_chat_template([{"role": "user", "content": record["prompt"]}])))
        ids = torch.tensor(ex.ids)[None]
        logits = reference(ids[:, :-1])[0]  # [n - 1, V] in float64
        losses.append(F.cross_entropy(logits[n_prompt - 1:], ids[0, n_prompt:], reduction="none"))
    loss = torch.cat(losses).mean()
    loss.backward()
    assert batch.n_targets == sum(len(x) for x in losses)
    torch.testing.assert_close(out["total"].double() / batch.n_targets, loss, rtol=1e-5, atol=0)
    want = grads(reference)
    assert got.keys() == want.keys()
    for name in want:
        scale = want[name].abs().max().item()
        assert (got[name].double() - want[name]).abs().max().item() <= 1e-4 * scale + 1e-7, name


def test_packed_rows_give_the_unpacked_loss_and_gradients(setup, tmp_path):
    root, tok, model_dir, data = setup
    trainer = SFTTrainer(config(model_dir, data, "data.packing=true", "data.max_len=40"), tmp_path / "run", **QUIET)
    examples = trainer.train_examples[:6]
    packed = pack([examples[:3], examples[3:]], tok.pad_id, 40)
    assert packed.document_ids[0].max() == 3  # three examples and the padding's own segment
    results = []
    for batch in (packed, collate(examples, tok.pad_id)):
        trainer.model.zero_grad(set_to_none=True)
        out, _ = trainer.losses(batch)
        out["total"].backward()
        results.append((out["ce"].detach(), grads(trainer.model)))
    (packed_loss, packed_grads), (loss, unpacked_grads) = results
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=0)
    for name, g in unpacked_grads.items():
        torch.testing.assert_close(packed_grads[name], g, rtol=1e-4, atol=1e-6 * g.abs().max().item())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_resume_continues_the_same_trajectory(setup, tmp_path, dtype):
    root, tok, model_dir, data = setup
    sets = ("run.steps=8", "run.log_every=1", "run.eval_every=4", "run.save_every=3", f"run.dtype='{dtype}'",
            "data.grad_accum=2", "balance.bias_update_speed=0.01")
    straight = SFTTrainer(config(model_dir, data, *sets), tmp_path / "a", **QUIET).train()
    interrupted = SFTTrainer(config(model_dir, data, *sets), tmp_path / "b", **QUIET)
    kill_at(interrupted, 5)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert latest_checkpoint(tmp_path / "b").name == "step_000003"
    resumed = SFTTrainer.resume(tmp_path / "b", **QUIET)
    assert resumed.step == 3
    result = resumed.train()
    records = lambda run: [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(run)]  # noqa: E731
    assert records(tmp_path / "b") == records(tmp_path / "a")
    a, b = (load_file(str(r.final_dir / "model.safetensors")) for r in (straight, result))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # router biases included


def test_fine_tuning_lowers_the_loss_and_writes_a_run(setup, tmp_path):
    transformers = pytest.importorskip("transformers")
    root, tok, model_dir, data = setup
    trainer = SFTTrainer(config(model_dir, data, "run.steps=24", "run.eval_every=12", "run.log_every=6",
                                "run.save_every=12", "data.packing=true", "data.max_len=64"), tmp_path / "run", **QUIET)
    before = trainer.evaluate()["val_loss"]
    assert before == pytest.approx(math.log(tok.vocab_size), abs=0.3)
    result = trainer.train()
    assert result.val["val_loss"] < before - 1.0
    train = [r for r in read_metrics(result.run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [6, 12, 18, 24]
    for key in ("loss", "lr", "grad_norm", "targets", "tokens_per_s", "maxvio_mean", "expert_load"):
        assert key in train[-1], key
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(result.final_dir)).eval()
    ours = load_model(result.final_dir)
    x = torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": "3+4="}]))])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=1e-4, atol=1e-4)
    assert (result.final_dir / "tokenizer.json").is_file()


def test_freezing_by_pattern_and_group(setup, tmp_path):
    root, tok, model_dir, data = setup
    cfg = config(model_dir, data, "run.steps=2", "run.eval_every=0", "model.freeze=['embeddings', 'router', "
                 "'model.layers.0.*']")
    trainer = SFTTrainer(cfg, tmp_path / "run", **QUIET)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    frozen = set(trainer.frozen)
    assert "model.embed_tokens.weight" in frozen and "model.layers.1.mlp.gate.weight" in frozen
    assert "mtp.0.mlp.gate.weight" in frozen and "model.layers.0.self_attn.kv_b_proj.weight" in frozen
    for name, param in trainer.model.named_parameters():  # MTP modules train only with loss.mtp_weight > 0
        assert torch.equal(param, before[name]) == (name in frozen or name.startswith("mtp.")), name
    with pytest.raises(ValueError, match="'nothing.*' matches no parameter"):
        SFTTrainer(config(model_dir, data, "model.freeze=['nothing.*']"), tmp_path / "bad", **QUIET)


def test_starts_from_a_model_saved_by_transformers(tmp_path):
    pytest.importorskip("transformers")
    from hf_models import hf_model

    tok = make_tokenizer()
    model = hf_model("v3", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                     pad_token_id=tok.pad_id)
    model.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic(16))
    trainer = SFTTrainer(config(tmp_path / "hf", data, "run.steps=2", "run.eval_every=0"), tmp_path / "run", **QUIET)
    x = torch.randint(0, tok.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(trainer.model.eval()(x), model(x).logits, rtol=1e-4, atol=1e-4)
    trainer.model.train()
    assert trainer.train().step == 2


def test_bad_input_is_named(setup, tmp_path, capsys):
    root, tok, model_dir, data = setup
    bare = make_model_dir(tmp_path / "bare", None)
    with pytest.raises(FileNotFoundError, match=r"bare holds no tokenizer \(tokenizer.json\)"):
        SFTTrainer(config(bare, data), tmp_path / "r1", **QUIET)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+1="\n')
    assert cli.main(["sft", "--model", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "r2"),
                     "--no-progress"]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "1+1=" * 30, "completion": "2"}])
    with pytest.raises(ValueError, match=r"long.jsonl:1: the prompt has \d+ tokens, which fill the context of 16"):
        SFTTrainer(config(model_dir, long, "data.max_len=16", "data.truncate=true"), tmp_path / "r3", **QUIET)
    with pytest.raises(ValueError, match="cannot be combined with data.packing"):
        config(model_dir, data, "data.packing=true", "loss.mtp_weight=0.1")
    with pytest.raises(ValueError, match=r"\[loss\] has"):
        config(model_dir, data, "loss.nope=1")
    SFTTrainer(config(model_dir, data, "run.steps=1", "run.eval_every=0"), tmp_path / "r4", **QUIET).train()
    with pytest.raises(ValueError, match="already holds a run"):
        SFTTrainer(config(model_dir, data), tmp_path / "r4", **QUIET)
    with pytest.raises(ValueError, match="only run.. and parallel.. settings"):
        SFTTrainer.resume(tmp_path / "r4", ["optim.lr=1"], **QUIET)


def test_cli_sft_and_resume(setup, tmp_path, capsys):
    root, tok, model_dir, data = setup
    out = tmp_path / "run"
    args = ["sft", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--freeze", "embeddings",
            "--set", "run.steps=2", "--set", "run.dtype='fp32'", "--no-progress", "--no-plots"]
    assert cli.main(args) == 0
    assert "fine-tuned" in capsys.readouterr().out
    assert cli.main(["sft", "--resume", str(out), "--set", "run.steps=3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "step 3" in printed and "loss.png" in printed
    assert SFTConfig.load(out / "sft_config.json").model.freeze == ["embeddings"]
    assert cli.main(["sft", "--resume", str(out), "--model", str(model_dir)]) == 2
    assert "--model cannot be combined with --resume" in capsys.readouterr().err


def test_linear_schedule_decays_to_the_floor():
    cfg = ScheduleSection(kind="linear", warmup_steps=2)
    factors = [lr_factor(s, 12, cfg, 0.1) for s in range(12)]
    assert factors[:2] == [0.5, 1.0] and factors[-1] == pytest.approx(0.1)
    assert factors[2] == 1.0 and all(b < a for a, b in zip(factors[2:], factors[3:]))
    assert factors[2] - factors[3] == pytest.approx(factors[9] - factors[10])  # a straight line


def test_pretraining_continues_from_a_model_directory(data_dir, tmp_path):
    from conftest import tiny_run_config

    from seekformer.training.pretrain import Trainer

    first = Trainer(tiny_run_config(data_dir, "run.steps=4", "run.eval_every=0", "optim.lr=3e-3"), tmp_path / "a",
                    **QUIET).train()
    cfg = tiny_run_config(data_dir, "run.steps=2", "run.eval_every=0", f"model.init='{first.final_dir}'")
    assert "preset" not in cfg.model
    trainer = Trainer(cfg, tmp_path / "b", **QUIET)
    assert trainer.evaluate()["val_loss"] == pytest.approx(first.val["val_loss"], rel=1e-6)  # the same weights
    assert trainer.train().step == 2
    with pytest.raises(ValueError, match=r"has 1 MTP module\(s\) but mtp.depth is 0"):
        Trainer(tiny_run_config(data_dir, "mtp.depth=0", f"model.init='{first.final_dir}'"), tmp_path / "c", **QUIET)
    other = make_model_dir(tmp_path / "other", make_tokenizer(vocab_size=384), 0)
    with pytest.raises(ValueError, match="the dataset's tokenizer is not the one of .*other"):
        Trainer(tiny_run_config(data_dir, f"model.init='{other}'"), tmp_path / "d", **QUIET)


def test_example_config_loads():
    from pathlib import Path

    cfg = SFTConfig.load(Path(__file__).parent.parent / "examples" / "sft.toml")
    assert cfg.data.packing and cfg.model.freeze == ["embeddings"] and cfg.run.epochs == 2.0
