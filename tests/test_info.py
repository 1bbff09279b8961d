"""`seekformer info`: parameter counts against the published model sizes, KV-cache bytes by formula."""

import json

import pytest
import torch

from seekformer import ModelConfig, Transformer
from seekformer.cli import main
from seekformer.model.stats import count_parameters, kv_cache_bytes_per_token

# published sizes (billions): total, activated per token
PUBLISHED = {
    "deepseek-v3": (671, 37),  # V3 report: 671B total, 37B activated (MTP not included)
    "deepseek-v2": (236, 21),  # V2 paper
    "deepseek-v2-lite": (15.7, 2.4),  # V2 paper, appendix
    "deepseek-moe-16b": (16.4, 2.8),  # DeepSeekMoE paper
    "deepseek-llm-7b": (6.9, 6.9),
    "deepseek-llm-67b": (67, 67),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published_sizes(name):
    with torch.device("meta"):
        model = Transformer(ModelConfig.preset(name))
    counts = count_parameters(model)
    total, active = PUBLISHED[name]
    assert counts.total / 1e9 == pytest.approx(total, rel=0.01)
    assert counts.active / 1e9 == pytest.approx(active, rel=0.12)  # papers round and differ on embeddings


def test_v3_mtp_module_size():
    with torch.device("meta"):
        model = Transformer(ModelConfig.preset("deepseek-v3"))
    # hub: 685B with the MTP module = 671B + 14B; its 14B include the shared embedding and head copies
    counts = count_parameters(model)
    assert (counts.mtp + counts.embedding) / 1e9 == pytest.approx(14, rel=0.05)


def test_kv_cache_bytes_follow_the_mla_formula():
    config = ModelConfig.preset("deepseek-v3")
    cached, mha = kv_cache_bytes_per_token(config, torch.bfloat16)
    assert cached == 61 * (512 + 64) * 2  # latent + rope key per layer
    assert mha == 61 * 128 * (192 + 128) * 2
    gqa = ModelConfig.preset("deepseek-llm-67b")
    assert kv_cache_bytes_per_token(gqa, torch.float32) == (95 * 2 * 8 * 128 * 4, 95 * 2 * 64 * 128 * 4)


def test_info_cli_on_preset_and_directory(tmp_path, capsys):
    assert main(["info", "deepseek-v3"]) == 0
    text = capsys.readouterr().out
    assert "671.03B total" in text and "70,272 B (MLA latent" in text and "71.1x" in text
    ModelConfig.preset("tiny-v2").save(tmp_path)
    assert main(["info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "deepseek_v2" and info["layers"] == {
        "total": 4, "dense": 1, "moe": 3, "mtp": 0, "engram": []}
    assert main(["info", "no-such-model"]) == 2
    assert "neither a model directory" in capsys.readouterr().err
