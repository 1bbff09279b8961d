"""Hub-layout checkpoints: sharding, MTP layers, FP8 weights, atomic saves and clear errors."""

import json
import math

import pytest
import torch
from conftest import randomize_norms_and_bias
from hf_models import VOCAB
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
    loaded = load_model(tmp_path)
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
    assert (a - b).norm() / a.norm() < 0.1  # fp8 rounding only
