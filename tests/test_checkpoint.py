"""Hub-layout checkpoints: sharding, MTP layers, FP8 weights, atomic saves and clear errors."""

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import randomize_norms_and_bias
from hf_models import VOCAB, hf_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from seekformer import CheckpointError, ModelConfig, Transformer, load_model
from seekformer.quant.fp8 import quantize_blockwise


def _tiny_v3(**overrides) -> Transformer:
    model = Transformer(ModelConfig.preset("tiny-v3", vocab_size=VOCAB, **overrides))
    randomize_norms_and_bias(model)
    return model.eval()


def _same_weights(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_sharded_save_load_round_trip(tmp_path):
    model = _tiny_v3()
    model.save_pretrained(tmp_path, max_shard_size="1MB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in index["weight_map"]
    _same_weights(model, load_model(tmp_path))
    # saving again unsharded removes the old shards and index
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    _same_weights(model, load_model(tmp_path))


def test_mtp_layer_uses_hub_keys_and_transformers_still_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny_v3()
    model.save_pretrained(tmp_path)
    keys = safe_open(str(tmp_path / "model.safetensors"), "pt").keys()
    L = model.config.num_hidden_layers
    for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                   "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight",
                   "mlp.experts.3.up_proj.weight", "mlp.gate.e_score_correction_bias"):
        assert f"model.layers.{L}.{suffix}" in keys
    loaded = load_model(tmp_path)
    _same_weights(model, loaded)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # drops the MTP layer itself
    ids = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        assert (reference(ids).logits - loaded(ids)).abs().max() <= 1e-4


def test_mtp_copies_that_differ_from_the_main_weights_are_reported(tmp_path):
    model = _tiny_v3()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    L = model.config.num_hidden_layers
    state[f"model.layers.{L}.shared_head.head.weight"] += 1.0
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"model.layers.{L}.shared_head.head.weight"):
        load_model(tmp_path)


def test_bf16_load_keeps_router_bias_in_float32(tmp_path):
    model = _tiny_v3()
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype=torch.bfloat16)
    gate = loaded.model.layers[1].mlp.gate
    assert loaded.dtype == torch.bfloat16 and gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, model.model.layers[1].mlp.gate.e_score_correction_bias)


def _edit(tmp_path, fn):
    state = load_file(tmp_path / "model.safetensors")
    fn(state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})


def test_broken_checkpoints_give_clear_errors(tmp_path):
    model = _tiny_v3(num_nextn_predict_layers=0)
    model.save_pretrained(tmp_path)

    _edit(tmp_path, lambda s: s.pop("model.layers.2.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\n  - model.layers.2.self_attn.kv_b_proj"):
        load_model(tmp_path)

    model.save_pretrained(tmp_path)
    _edit(tmp_path, lambda s: s.update({"model.layers.0.mlp.gate_proj.weight": torch.zeros(3, 3),
                                        "model.layers.9.foo.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert "model.layers.0.mlp.gate_proj.weight: checkpoint (3, 3) vs model (384, 128)" in message
    assert "unexpected keys (1):\n  - model.layers.9.foo.weight" in message

    model.save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path)


def test_missing_shard_and_missing_directory(tmp_path):
    model = _tiny_v3(num_nextn_predict_layers=0)
    model.save_pretrained(tmp_path, max_shard_size="1MB")
    next(iter(tmp_path.glob("model-00002-*.safetensors"))).unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-.* listed in model.safetensors.index.json is missing"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    ModelConfig.preset("tiny-v3").save(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no weights in"):
        load_model(tmp_path / "empty")


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    from seekformer import checkpoint

    model = _tiny_v3(num_nextn_predict_layers=0)
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def exploding_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", exploding_save)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    load_model(tmp_path)


def _fp8_reference(weight_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Dequantize with an explicit loop over blocks in float64 (independent of the library)."""
    out = torch.empty(weight_fp8.shape, dtype=torch.float64)
    for bi in range(math.ceil(weight_fp8.shape[0] / block)):
        for bj in range(math.ceil(weight_fp8.shape[1] / block)):
            rows, cols = slice(bi * block, (bi + 1) * block), slice(bj * block, (bj + 1) * block)
            out[rows, cols] = weight_fp8[rows, cols].double() * scale_inv[bi, bj].double()
    return out


def test_fp8_checkpoint_dequantizes_to_float64_reference(tmp_path):
    # hidden 160 and intermediate 200 make partial 128x128 edge blocks
    model = Transformer(ModelConfig.preset("tiny-v3", vocab_size=VOCAB, hidden_size=160,
                                           intermediate_size=200, moe_intermediate_size=96,
                                           num_nextn_predict_layers=0))
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    quantized = {}
    for key in list(state):
        if key.endswith("_proj.weight") and "mlp.gate." not in key:
            fp8, scale_inv = quantize_blockwise(state[key])
            state[key], state[key + "_scale_inv"] = fp8, scale_inv
            quantized[key] = _fp8_reference(fp8, scale_inv)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    loaded = load_model(tmp_path, dtype=torch.float64)
    from seekformer.checkpoint import hub_state_items

    got = dict(hub_state_items(loaded))
    assert "model.layers.0.mlp.down_proj.weight" in quantized  # a partial-block dense weight
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in quantized
    for key, expected in quantized.items():
        assert torch.equal(got[key], expected), key
    assert torch.equal(got["model.embed_tokens.weight"], state["model.embed_tokens.weight"].double())


def test_fp8_save_option_writes_hub_format(tmp_path):
    model = _tiny_v3(num_nextn_predict_layers=0)
    model.save_pretrained(tmp_path, fp8=True)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.self_attn.kv_b_proj.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("model.layers.1.self_attn.kv_b_proj.weight_scale_inv").shape == (2, 1)  # [256, 64]
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.float32
        assert f.get_tensor("lm_head.weight").dtype == torch.float32
        scales = {k[: -len("_scale_inv")]: f.get_tensor(k).double() for k in f.keys() if k.endswith("_scale_inv")}
    from seekformer.checkpoint import hub_state_items

    original = dict(hub_state_items(model))
    loaded = dict(hub_state_items(load_model(tmp_path, dtype=torch.float64)))
    assert len(scales) > 20
    for key, w in original.items():
        w, got = w.double(), loaded[key]
        if key not in scales:
            assert torch.equal(got, w), key  # not quantized: exact
            continue
        # e4m3 keeps 3 mantissa bits: round to nearest is within 2^-4 relative for values in its normal
        # range (>= 2^-6 once divided by the block scale); below, within half a subnormal step (2^-10)
        scale = scales[key].repeat_interleave(128, 0).repeat_interleave(128, 1)[: w.shape[0], : w.shape[1]]
        normal = w.abs() >= scale * 2**-6
        assert ((got - w).abs() <= 2**-4 * w.abs())[normal].all(), key
        assert ((got - w).abs() <= 2**-10 * scale)[~normal].all(), key


# ---------------------------------------------------------------------- MTP layers saved or not
def _hf_v3_with_mtp_declared(directory):
    """A DeepSeek-V3 saved by transformers: config.json declares an MTP layer, the weights have none."""
    reference = hf_model("v3", num_nextn_predict_layers=1)
    randomize_norms_and_bias(reference)
    reference.save_pretrained(directory)
    assert json.loads((directory / "config.json").read_text())["num_nextn_predict_layers"] == 1
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("model.layers.3.") for k in f.keys())
    return reference


def test_v3_saved_by_transformers_loads_without_mtp_and_says_so(tmp_path):
    reference = _hf_v3_with_mtp_declared(tmp_path)
    with pytest.warns(UserWarning, match=r"declares 1 MTP module.*no weights under model\.layers\.3\.\*.*"
                                         r"transformers does not save them.*MTP speculative decoding"):
        model = load_model(tmp_path)
    assert len(model.mtp) == 0 and model.config.num_nextn_predict_layers == 0
    from seekformer.checkpoint import hub_state_items

    saved = load_file(tmp_path / "model.safetensors")
    ours = dict(hub_state_items(model))
    assert ours.keys() == saved.keys()
    for key, tensor in saved.items():
        assert torch.equal(ours[key], tensor), key  # the main model, exactly
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        assert (reference(ids).logits - model(ids)).abs().max() <= 1e-4
    with pytest.raises(CheckpointError, match=r"MTP required.*declares 1 MTP module.*holds weights for 0 "
                                              r"\(nothing under model\.layers\.3\.\*\)"):
        load_model(tmp_path, mtp="require")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning
        skipped = load_model(tmp_path, mtp="skip")
    with torch.no_grad():
        assert torch.equal(skipped(ids), model(ids))
    with pytest.raises(ValueError, match="mtp must be one of if_present, require, skip, got 'yes'"):
        load_model(tmp_path, mtp="yes")


def test_mtp_choice_on_a_checkpoint_that_holds_the_mtp_layer(tmp_path):
    model = _tiny_v3()
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = load_model(tmp_path, mtp="require")
        main = load_model(tmp_path, mtp="skip")
    _same_weights(model, full)
    assert len(full.mtp) == 1 and len(main.mtp) == 0 and main.config.num_nextn_predict_layers == 0
    n_mtp = sum(p.numel() for p in full.mtp.parameters())
    assert sum(p.numel() for p in main.parameters()) == sum(p.numel() for p in full.parameters()) - n_mtp > 0
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert torch.equal(main(ids), full(ids))
    main.save_pretrained(tmp_path / "main")  # the main model alone says so in its config
    assert json.loads((tmp_path / "main" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    with pytest.raises(CheckpointError, match="MTP required, but config.json declares 0 MTP module"):
        load_model(tmp_path / "main", mtp="require")


# ---------------------------------------------------------------------- atomic saves
def _die_at_step(monkeypatch, step: int) -> list[str]:
    """Make the `step`-th call (counting from 1) of any step of a save raise KeyboardInterrupt before
    it runs, as a kill would stop it there; returns the names of the steps called so far."""
    import shutil

    from seekformer import checkpoint, io_utils

    steps = [(checkpoint, "save_file"), (checkpoint, "atomic_write_text"), (ModelConfig, "save"),
             (checkpoint, "_save_tokenizer"), (checkpoint, "_carry_over"), (io_utils, "_exchange"),
             (shutil, "rmtree")]
    calls: list[str] = []
    for owner, attr in steps:
        original = getattr(owner, attr, None)
        if original is None:
            continue

        def wrapped(*args, _original=original, _name=attr, **kwargs):
            calls.append(_name)
            if len(calls) == step:
                raise KeyboardInterrupt
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, attr, wrapped)
    return calls


def _tokenizer(vocab: int = 300):
    from seekformer.tokenizer import train_tokenizer

    text = "def add(a, b):\n    return a + b\n" * 20 + "class Point:\n    x: int = 0\n" * 20
    return train_tokenizer([text], vocab_size=vocab)


def test_a_save_killed_at_any_step_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch):
    old = _tiny_v3(num_nextn_predict_layers=0)
    new = _tiny_v3(num_nextn_predict_layers=0)  # other weights
    target = tmp_path / "model"
    tokenizer = _tokenizer()
    outcomes = []
    for step in range(1, 100):
        old.save_pretrained(target, max_shard_size="3MB")  # shards and an index
        tokenizer.save(target)
        (target / "README.md").write_text("the user's notes")
        calls = _die_at_step(monkeypatch, step)
        try:
            new.save_pretrained(target, max_shard_size="3MB")  # shards of the same names
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.undo()
        loaded = load_model(target)
        same_as_new = torch.equal(loaded.lm_head.weight, new.lm_head.weight)
        _same_weights(new if same_as_new else old, loaded)  # all old or all new, never a mix
        assert (target / "README.md").read_text() == "the user's notes"  # files the save does not write stay
        assert (target / "tokenizer.json").is_file() and (target / "tokenizer_config.json").is_file()
        assert not list(tmp_path.glob(".model.*"))  # nothing left beside it
        outcomes.append(same_as_new)
        if finished:
            break
    assert calls.count("save_file") == 3 and len(outcomes) == len(calls) + 1 >= 8
    assert finished and outcomes[-1] and not outcomes[0], (outcomes, calls)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    assert sorted(p.name for p in target.glob("*.safetensors")) == sorted(set(index["weight_map"].values()))


def test_a_killed_process_leaves_only_a_hidden_directory_that_the_next_save_removes(tmp_path):
    model = _tiny_v3(num_nextn_predict_layers=0)
    target = tmp_path / "model"
    model.save_pretrained(target)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = tmp_path / f".model.saving-{dead.pid}-x1y2z3_4"
    elsewhere = tmp_path / f".other.saving-{dead.pid}-abcdefgh"  # beside it, for another target
    running = tmp_path / f".model.saving-{os.getpid()}-abcdefgh"  # a save in progress (this process)
    users = tmp_path / f".notes.saving-{dead.pid}-mine"  # not a name seekformer makes
    for path in (abandoned, elsewhere, running, users):
        path.mkdir()
    model.save_pretrained(target)
    assert not abandoned.exists() and not elsewhere.exists() and running.exists() and users.exists()


_SAVER = """
import sys, torch
from seekformer import ModelConfig, Transformer
models = []
for seed in (1, 2):
    torch.manual_seed(seed)
    models.append(Transformer(ModelConfig.preset("tiny-v3", num_nextn_predict_layers=0)))
models[0].save_pretrained(sys.argv[1], max_shard_size="3MB")
print("saved", flush=True)
for i in range(1000):
    models[(i + 1) % 2].save_pretrained(sys.argv[1], max_shard_size="3MB")
"""


def test_a_process_killed_while_saving_leaves_a_whole_checkpoint(tmp_path):
    """A real SIGKILL (no exception handler runs) in the middle of saves, over and over, into one place."""
    import signal

    expected = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        expected.append(Transformer(ModelConfig.preset("tiny-v3", num_nextn_predict_layers=0)))
    target = tmp_path / "model"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    saver = subprocess.Popen([sys.executable, "-c", _SAVER, str(target)], stdout=subprocess.PIPE, env=env, text=True)
    assert saver.stdout.readline() == "saved\n"
    import time

    time.sleep(1.0)  # a few saves in, probably inside one
    saver.send_signal(signal.SIGKILL)
    saver.wait()
    loaded = load_model(target)
    which = 0 if torch.equal(loaded.lm_head.weight, expected[0].lm_head.weight) else 1
    _same_weights(expected[which], loaded)
    loaded.save_pretrained(target)  # the next save clears what the killed one left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_save_into_a_mount_point_replaces_files_one_by_one(tmp_path, monkeypatch):
    import seekformer.checkpoint as checkpoint

    model = _tiny_v3(num_nextn_predict_layers=0)
    model.save_pretrained(tmp_path, max_shard_size="1MB")
    (tmp_path / "notes.txt").write_text("kept")
    monkeypatch.setattr(checkpoint.os.path, "ismount", lambda path: str(path) == str(tmp_path))
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    _same_weights(model, load_model(tmp_path))


# ---------------------------------------------------------------------- tokenizer
def test_save_with_the_tokenizer_makes_a_directory_generate_runs_on(tmp_path, capsys):
    from seekformer import generate
    from seekformer.cli import main

    tokenizer = _tokenizer()
    model = Transformer(ModelConfig.preset("tiny-v3", vocab_size=320)).eval()
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "def add", "--max-new-tokens", "8",
                 "--temperature", "0", "--dtype", "fp32", "--no-stats"]) == 0
    expected = generate(model, tokenizer.encode("def add"), max_new_tokens=8, stop_tokens=[tokenizer.eos_id])
    assert capsys.readouterr().out == tokenizer.decode(expected.tokens[0], skip_special_tokens=True) + "\n"

    from transformers import PreTrainedTokenizerFast  # a transformers tokenizer is saved its own way

    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token="<|end_of_text|>")
    model.save_pretrained(tmp_path / "hf", tokenizer=hf_tokenizer)
    from seekformer import load_tokenizer

    assert load_tokenizer(tmp_path / "hf").encode("def add(a, b)") == tokenizer.encode("def add(a, b)")

    small = _tiny_v3(num_nextn_predict_layers=0)  # 256 tokens
    with pytest.raises(ValueError, match=f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is 256"):
        small.save_pretrained(tmp_path / "small", tokenizer=tokenizer)
    assert not (tmp_path / "small").exists()
