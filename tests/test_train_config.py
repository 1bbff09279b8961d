"""Run configuration (TOML + overrides, type checks) and the step schedules."""

from __future__ import annotations

import pytest

from seekformer.training.optim import bias_update_speed, lr_factor, mtp_weight, param_groups
from seekformer.training.run_config import RunConfig, RunConfigError, ScheduleSection, parse_value


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        "[model]\npreset = 'tiny-v3'\nhidden_size = 96\nq_lora_rank = 32\n\n"
        "[optim]\nlr = 1e-3\n\n[schedule]\nkind = 'wsd'\n\n[balance]\nbias_update_speed = 0.002\n"
    )
    cfg = RunConfig.load(path)
    cfg.apply_overrides(["optim.lr=2e-3", "run.steps=50", "model.q_lora_rank=none", "optim.weight_decay=0",
                         "run.dtype=fp32"])
    assert cfg.optim.lr == 2e-3 and cfg.run.steps == 50 and cfg.schedule.kind == "wsd"
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)  # int accepted for float
    assert cfg.run.dtype == "fp32"  # a bare word is a string
    model = cfg.model_config(vocab_size=500, special_ids={"eos_token_id": 1})
    assert model.hidden_size == 96 and model.q_lora_rank is None and model.vocab_size == 500
    assert model.num_nextn_predict_layers == cfg.mtp.depth == 1
    # the saved JSON is a valid config for a new run (and what --resume reads)
    cfg.save(tmp_path / "run_config.json")
    again = RunConfig.load(tmp_path / "run_config.json")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(("override", "match"), [
    ("optim.lrr=1", "unknown setting 'optim.lrr'; \\[optim\\] has: lr, min_lr_ratio"),
    ("optimizer.lr=1", "unknown section \\[optimizer\\]"),
    ("lr=1", "must be section.key"),
    ("optim.lr='fast'", "optim.lr: expected float, got 'fast'"),
    ("run.steps=1.5", "run.steps: expected int"),
    ("run.steps=true", "run.steps: expected int"),
    ("model.hidden_sise=3", "unknown model setting 'hidden_sise'"),
    ("model.hidden_size='big'", "model.hidden_size: expected int"),
    ("model.num_nextn_predict_layers=2", "mtp.depth"),
    ("model.preset='tiny-v9'", "unknown model preset 'tiny-v9'"),
    ("schedule.kind='exponential'", "schedule.kind must be one of cosine, linear, wsd, constant"),
    ("optim.lr=0", "optim.lr must be > 0"),
    ("optim.lr", "expected section.key=value"),
])
def test_bad_settings_name_the_key(override, match):
    with pytest.raises(RunConfigError, match=match):
        RunConfig().apply_overrides([override])


def test_toml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[optim]\nlr = 'x'\n")
    with pytest.raises(RunConfigError, match="bad.toml: optim.lr: expected float"):
        RunConfig.load(path)
    path.write_text("[optim\n")
    with pytest.raises(RunConfigError, match="cannot parse"):
        RunConfig.load(path)
    with pytest.raises(FileNotFoundError):
        RunConfig.load(tmp_path / "missing.toml")


def test_model_from_a_config_file(tmp_path):
    from seekformer import ModelConfig

    ModelConfig.preset("tiny-v2").save(tmp_path)
    cfg = RunConfig()
    cfg.apply_overrides([f"model.config='{tmp_path}'", "model.hidden_size=96", "mtp.depth=0"])
    assert "preset" not in cfg.model
    model = cfg.model_config(vocab_size=1024)
    assert model.model_type == "deepseek_v2" and model.hidden_size == 96 and model.topk_method == "group_limited_greedy"


def test_model_vocabulary_must_cover_the_data():
    cfg = RunConfig()
    cfg.apply_overrides(["model.vocab_size=100"])
    with pytest.raises(RunConfigError, match="smaller than the dataset's vocabulary"):
        cfg.model_config(vocab_size=500)


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("3e-4") == 3e-4 and parse_value("true") is True
    assert parse_value("[1, 2]") == [1, 2] and parse_value("'a b'") == "a b" and parse_value("cosine") == "cosine"
    assert parse_value("None") is None and parse_value("{ type = 'yarn', factor = 4 }") == {"type": "yarn", "factor": 4}


def test_run_presets():
    demo = RunConfig.preset("demo")
    assert demo.model["preset"] == "tiny-v3"
    with pytest.raises(RunConfigError, match="unknown run preset"):
        RunConfig.preset("nope")


@pytest.mark.parametrize("name", ["engram.toml", "mtp.toml", "mtp_deep.toml"])
def test_example_configs_build_their_models(name):
    from pathlib import Path

    cfg = RunConfig.load(Path(__file__).resolve().parents[1] / "examples" / name)
    model = cfg.model_config(vocab_size=8192)
    if name.startswith("mtp"):  # the models of docs/benchmarks.md, "MTP speculative decoding"
        shape = (24, 192) if name == "mtp_deep.toml" else (12, 256)
        assert (model.num_hidden_layers, model.hidden_size, model.num_nextn_predict_layers) == (*shape, 1)
        assert cfg.run.steps == 600 and cfg.data.batch_size * cfg.data.seq_len == 2048
    else:
        assert model.engram_layer_ids == [1]


def test_cosine_schedule():
    s = ScheduleSection(kind="cosine", warmup_steps=10)
    factors = [lr_factor(i, 100, s, 0.1) for i in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)  # linear warmup
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)  # cosine down to min
    assert factors[55] == pytest.approx(0.55, abs=0.02)  # half way: the mean of 1 and 0.1
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_warmup_stable_decay_schedule():
    s = ScheduleSection(kind="wsd", warmup_steps=5, decay_fraction=0.2)
    factors = [lr_factor(i, 100, s, 0.0) for i in range(100)]
    assert factors[4] == 1.0 and all(f == 1.0 for f in factors[5:80])
    assert factors[80] == pytest.approx(0.95) and factors[-1] == pytest.approx(0.0)
    assert lr_factor(50, 100, ScheduleSection(kind="constant", warmup_steps=5), 0.1) == 1.0


def test_v3_style_switches():
    cfg = RunConfig()
    cfg.apply_overrides(["mtp.weight=0.3", "mtp.weight_after=0.1", "mtp.switch_fraction=0.7",
                         "balance.bias_update_speed=0.001", "balance.bias_update_until=0.9"])
    assert mtp_weight(69, 100, cfg.mtp) == 0.3 and mtp_weight(70, 100, cfg.mtp) == 0.1
    assert bias_update_speed(89, 100, cfg.balance) == 0.001 and bias_update_speed(90, 100, cfg.balance) == 0.0


def test_param_groups_decay_matrices_only():
    from seekformer import ModelConfig, Transformer

    model = Transformer(ModelConfig.preset("tiny-v3"))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grad_norm_equals_torch_and_leaves_unclipped_gradients_alone(max_norm):
    """Below the threshold the gradients are not rewritten at all (same memory, same values); above
    it they equal torch's clip_grad_norm_; the returned norm is torch's either way."""
    import torch

    from seekformer.training.optim import clip_grad_norm

    gen = torch.Generator().manual_seed(0)
    mine = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((7, 5), (3,), (2, 4, 6))]
    theirs = [torch.nn.Parameter(torch.zeros(p.shape)) for p in mine]
    for a, b in zip(mine, theirs):
        a.grad = torch.randn(a.shape, generator=gen)
        b.grad = a.grad.clone()
    before = [p.grad.clone() for p in mine]
    pointers = [p.grad.data_ptr() for p in mine]
    version = [p.grad._version for p in mine]
    norm = clip_grad_norm(mine, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert torch.equal(norm, expected)
    for a, b in zip(mine, theirs):
        assert torch.equal(a.grad, b.grad)
    assert [p.grad.data_ptr() for p in mine] == pointers
    if max_norm > 1:  # nothing to clip: not even a multiplication by 1
        assert [p.grad._version for p in mine] == version
        assert all(torch.equal(p.grad, g) for p, g in zip(mine, before))
    else:
        assert not torch.equal(mine[0].grad, before[0])
