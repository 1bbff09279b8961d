"""`seekformer info`: parameter counts against the published model sizes, KV-cache bytes by formula."""

import json

import pytest
import torch

from seekformer import ModelConfig, Transformer
from seekformer.cli import main
from seekformer.config import PRESETS
from seekformer.model.stats import count_parameters, flops_per_token, kv_cache_bytes_per_token


def _hand_count(c: ModelConfig) -> tuple[int, int, int]:
    """(total, active, MTP) parameters from the architecture's formulas alone, active as DeepSeek counts
    it (DeepSeek-V3's README_WEIGHTS.md: "36.6B (including 0.9B for the output Head)"): the output head
    but not the embedding table, whose row lookup multiplies nothing; K of the E routed experts."""
    H, V, heads = c.hidden_size, c.vocab_size, c.num_attention_heads
    if c.is_mla:
        q = (H * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * heads * c.qk_head_dim if c.q_lora_rank
             else H * heads * c.qk_head_dim)  # (down, norm, up) or one projection
        kv = H * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank + c.kv_lora_rank * heads * (
            c.qk_nope_head_dim + c.v_head_dim)
        attention = q + kv + heads * c.v_head_dim * H
    else:
        d = c.attn_head_dim
        attention = 2 * H * heads * d + 2 * H * c.num_key_value_heads * d  # q, o; k, v
    expert = 3 * H * c.moe_intermediate_size

    def layer(i: int) -> tuple[int, int]:
        norms = 2 * H
        if not c.is_moe_layer(i):
            return attention + 3 * H * c.intermediate_size + norms, attention + 3 * H * c.intermediate_size + norms
        always = attention + norms + c.n_routed_experts * H + (c.n_shared_experts or 0) * expert  # router, shared
        return always + c.n_routed_experts * expert, always + c.num_experts_per_tok * expert

    layers = [layer(i) for i in range(c.num_hidden_layers)]
    total = 2 * V * H + sum(t for t, _ in layers) + H  # embedding, head, layers, final norm
    active = V * H + sum(a for _, a in layers) + H
    mtp = c.num_nextn_predict_layers * (2 * H + 2 * H * H + layer(c.num_hidden_layers)[0] + H)
    return total, active, mtp


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts_are_exact(name):
    config = ModelConfig.preset(name)
    with torch.device("meta"):
        counts = count_parameters(Transformer(config))
    total, active, mtp = _hand_count(config)
    assert (counts.total, counts.active, counts.mtp) == (total, active, mtp)
    assert counts.embedding == 2 * config.vocab_size * config.hidden_size


# published sizes in billions: total, activated, how far the publication's rounding may be off
PUBLISHED = {
    "deepseek-v3": (671, 36.6, 0.05),  # README_WEIGHTS.md (the report's 37B rounds it); MTP not included
    "deepseek-v2": (236, 21, 0.5),  # V2 paper
    "deepseek-v2-lite": (15.7, 2.4, 0.06),  # V2 paper; 2.45B counted this way, the paper rounds down
    "deepseek-llm-67b": (67, None, None),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published_sizes(name):
    with torch.device("meta"):
        counts = count_parameters(Transformer(ModelConfig.preset(name)))
    total, active, slack = PUBLISHED[name]
    assert counts.total / 1e9 == pytest.approx(total, rel=0.01)
    if active is not None:
        assert abs(counts.active / 1e9 - active) <= slack


def test_deepseekmoe_paper_counts_the_embedding_as_activated():
    # the DeepSeekMoE paper's 16.4B total, 2.8B activated: its 2.8B also counts the embedding (0.21B)
    config = ModelConfig.preset("deepseek-moe-16b")
    with torch.device("meta"):
        counts = count_parameters(Transformer(config))
    assert counts.total / 1e9 == pytest.approx(16.4, abs=0.05)
    assert (counts.active + config.vocab_size * config.hidden_size) / 1e9 == pytest.approx(2.8, abs=0.05)


def test_flops_per_token_count_the_head_and_not_the_embedding():
    config = ModelConfig.preset("deepseek-v3")
    with torch.device("meta"):
        counts = count_parameters(Transformer(config))
    _, active, _ = _hand_count(config)
    T = 4096
    attention = 61 * 2 * 128 * (192 + 128) * (T + 1) / 2
    assert flops_per_token(config, counts, T, training=False) == 2 * active + attention


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
    assert "671.03B total, 36.63B active per token" in text and "70,272 B (MLA latent" in text and "71.1x" in text
    ModelConfig.preset("tiny-v2").save(tmp_path)
    assert main(["info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "deepseek_v2" and info["layers"] == {
        "total": 4, "dense": 1, "moe": 3, "mtp": 0, "engram": []}
    assert main(["info", "no-such-model"]) == 2
    assert "neither a model directory" in capsys.readouterr().err
