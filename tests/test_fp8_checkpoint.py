"""FP8 files: `seekformer quantize`, transformers round trips, quantization_config on save, loading
corner cases, and FP8 weights kept in memory (`keep_fp8=True`)."""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import VOCAB, hf_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from seekformer import CheckpointError, ModelConfig, Transformer, load_model
from seekformer.cli import main
from seekformer.inference import generate
from seekformer.quant.fp8_inference import FP8Experts, KeptFP8Linear


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    """A tiny transformers DeepSeek-V3 (every projection at most 128 wide: see test_transformers_loads_
    what_seekformer_quantize_writes) saved, then quantized by the CLI."""
    root = tmp_path_factory.mktemp("fp8")
    torch.manual_seed(0)
    hf_model("v3").save_pretrained(root / "bf16")
    assert main(["quantize", "--model", str(root / "bf16"), "--out", str(root / "fp8")]) == 0
    return root / "fp8"


def _config(directory) -> dict:
    return json.loads((directory / "config.json").read_text())


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def test_quantize_writes_the_hub_fp8_layout(fp8_dir):
    assert _config(fp8_dir)["quantization_config"] == {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
    with safe_open(str(fp8_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for key in ("model.layers.0.self_attn.kv_b_proj", "model.layers.1.mlp.experts.7.down_proj",
                    "model.layers.1.mlp.shared_experts.gate_proj", "model.layers.0.mlp.up_proj"):
            assert f.get_tensor(f"{key}.weight").dtype == torch.float8_e4m3fn
            assert f.get_tensor(f"{key}.weight_scale_inv").dtype == torch.float32
        for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                    "model.layers.0.input_layernorm.weight"):
            assert f.get_tensor(key).dtype == torch.float32 and f"{key}_scale_inv" not in keys


def test_quantize_refuses_fp8_input_and_a_non_empty_output(fp8_dir, capsys):
    assert main(["quantize", "--model", str(fp8_dir), "--out", str(fp8_dir.parent / "again")]) == 2
    assert "already holds FP8 weights" in capsys.readouterr().err
    assert main(["quantize", "--model", str(fp8_dir.parent / "bf16"), "--out", str(fp8_dir)]) == 2
    assert "not an empty directory" in capsys.readouterr().err


def test_transformers_loads_what_seekformer_quantize_writes(fp8_dir):
    """transformers 5.25 on CPU dequantises FP8 checkpoints at load (its FP8 kernels need a GPU); its
    logits equal seekformer's FP8 load, which dequantises the same e4m3 values with the same scales."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(fp8_dir).eval()
    ids = torch.randint(0, VOCAB, (2, 24))
    ours = _logits(load_model(fp8_dir), ids)
    torch.testing.assert_close(_logits(reference, ids), ours, rtol=1e-4, atol=1e-4)
    # and it is FP8: near, not equal, to the unquantised model
    dense = _logits(load_model(fp8_dir.parent / "bf16"), ids)
    assert 1e-3 < (dense - ours).norm() / dense.norm() < 0.1


def test_resaving_an_fp8_load_writes_bf16_without_quantization_config(fp8_dir, tmp_path):
    """Bug: a model loaded from an FP8 release was re-saved as dense weights under a config that still
    said FP8, which transformers then failed to load."""
    from transformers import AutoModelForCausalLM

    model = load_model(fp8_dir, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in _config(tmp_path)
    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "model.safetensors").values()
               if t.dtype != torch.float32)  # the router bias stays float32
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    torch.testing.assert_close(_logits(reference, ids), _logits(model, ids), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["v2", "llama"])
def test_fp8_save_writes_quantization_config_for_every_model_type(kind, tmp_path):
    """Bug: `fp8=True` on V2/Llama wrote FP8 weights without quantization_config."""
    from transformers import AutoModelForCausalLM

    hf_model(kind).save_pretrained(tmp_path / "src")
    model = load_model(tmp_path / "src")
    model.save_pretrained(tmp_path / "fp8", fp8=True)
    assert _config(tmp_path / "fp8")["quantization_config"]["quant_method"] == "fp8"
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8").eval()
    ids = torch.randint(0, VOCAB, (1, 16))
    torch.testing.assert_close(_logits(reference, ids), _logits(load_model(tmp_path / "fp8"), ids),
                               rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "fp8", fp8=False)  # and dropped again when dense weights are written
    assert "quantization_config" not in _config(tmp_path / "fp8")


def _shard_apart(directory, moved: set[str]) -> None:
    """Rewrite a single-file checkpoint as two shards with the `moved` keys in the second."""
    state = load_file(directory / "model.safetensors")
    second = {k: state.pop(k) for k in moved}
    save_file(state, directory / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(second, directory / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    (directory / "model.safetensors").unlink()
    weight_map = {k: "model-00001-of-00002.safetensors" for k in state}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in second})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _copy(src, dst):
    dst.mkdir()
    for path in src.iterdir():
        (dst / path.name).write_bytes(path.read_bytes())
    return dst


def test_scales_are_found_in_another_shard(fp8_dir, tmp_path):
    sharded = _copy(fp8_dir, tmp_path / "sharded")
    _shard_apart(sharded, {"model.layers.0.self_attn.kv_b_proj.weight_scale_inv",
                           "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"})
    ids = torch.randint(0, VOCAB, (1, 12))
    assert torch.equal(_logits(load_model(sharded), ids), _logits(load_model(fp8_dir), ids))
    kept = _logits(load_model(sharded, keep_fp8=True), ids)
    assert torch.equal(kept, _logits(load_model(fp8_dir, keep_fp8=True), ids))


def test_bad_fp8_tensors_are_clear_checkpoint_errors(fp8_dir, tmp_path):
    key = "model.layers.0.self_attn.o_proj.weight"
    e5m2 = _copy(fp8_dir, tmp_path / "e5m2")
    state = load_file(e5m2 / "model.safetensors")
    state[key] = state[key].float().to(torch.float8_e5m2)
    save_file(state, e5m2 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{key} .*float8_e5m2: only float8_e4m3fn"):
        load_model(e5m2)

    bad_scale = _copy(fp8_dir, tmp_path / "scale")
    state = load_file(bad_scale / "model.safetensors")
    state[key + "_scale_inv"] = torch.ones(2, 2)
    save_file(state, bad_scale / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{key}_scale_inv has shape \(2, 2\).* needs \(1, 1\)"):
        load_model(bad_scale)
    with pytest.raises(CheckpointError, match=rf"{key}_scale_inv: checkpoint \(2, 2\) vs model \(1, 1\)"):
        load_model(bad_scale, keep_fp8=True)

    with pytest.raises(CheckpointError, match="keep_fp8=True needs an FP8 checkpoint"):
        load_model(fp8_dir.parent / "bf16", keep_fp8=True)


def test_keep_fp8_matches_the_dequantised_model_with_half_the_weight_memory(fp8_dir):
    kept = load_model(fp8_dir, dtype=torch.bfloat16, keep_fp8=True)
    dense = load_model(fp8_dir, dtype=torch.bfloat16)
    assert any(isinstance(m, FP8Experts) for m in kept.modules())
    assert isinstance(kept.model.layers[0].self_attn.kv_b_proj, KeptFP8Linear)
    assert kept.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.float8_e4m3fn
    ids = torch.randint(0, VOCAB, (2, 20))
    torch.testing.assert_close(_logits(kept, ids), _logits(dense, ids), rtol=0, atol=2e-2)

    def quantized_bytes(model: Transformer) -> int:
        state = model.state_dict()
        return sum(t.numel() * t.element_size() for k, t in state.items()
                   if k.endswith(("proj", "proj.weight", "proj_scale_inv", "proj.weight_scale_inv")))

    ratio = quantized_bytes(kept) / quantized_bytes(dense)
    assert 0.5 <= ratio < 0.52  # 1 byte per weight + 4 bytes per (partial) 128x128 block, vs 2 bytes


def test_keep_fp8_decodes_like_the_dequantised_model_on_both_mla_paths(fp8_dir, one_thread):
    """The absorbed MLA path reads kv_b_proj's weight directly: kept in FP8 it must dequantise it."""
    kept = load_model(fp8_dir, keep_fp8=True)
    dense = load_model(fp8_dir)
    prompt = torch.randint(0, VOCAB, (2, 7))
    for path in ("naive", "absorbed"):
        a = generate(kept, prompt, max_new_tokens=8, attention_path=path, stop_tokens=[])
        b = generate(dense, prompt, max_new_tokens=8, attention_path=path, stop_tokens=[])
        assert a.tokens == b.tokens


def test_keep_fp8_resaves_as_fp8_or_dense(fp8_dir, tmp_path):
    kept = load_model(fp8_dir, keep_fp8=True)
    kept.save_pretrained(tmp_path / "fp8", fp8=True)
    original, again = load_file(fp8_dir / "model.safetensors"), load_file(tmp_path / "fp8" / "model.safetensors")
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k].float(), again[k].float()) for k in original)
    assert _config(tmp_path / "fp8")["quantization_config"] == _config(fp8_dir)["quantization_config"]
    kept.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in _config(tmp_path / "dense")
    ids = torch.randint(0, VOCAB, (1, 10))
    assert torch.equal(_logits(load_model(tmp_path / "dense"), ids), _logits(load_model(fp8_dir), ids))


def test_v3_config_without_fp8_writes_no_quantization_config(tmp_path):
    Transformer(ModelConfig.preset("tiny-v3", vocab_size=VOCAB)).save_pretrained(tmp_path)
    assert "quantization_config" not in _config(tmp_path)
