"""ModelConfig: hub config.json round trips, defaults per model type, presets and validation errors."""

import json

import pytest

from seekformer import ConfigError, ModelConfig
from seekformer.config import PRESETS

# config.json of the released DeepSeek-V3 (the fields that matter here), as published on the hub
V3_HUB = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06, "rope_theta": 10000, "ep_size": 1, "num_nextn_predict_layers": 1,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "torch_dtype": "bfloat16",
}


def test_hub_v3_config_reads_and_round_trips(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(V3_HUB))
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.rope_type == "yarn" and cfg.num_nextn_predict_layers == 1 and cfg.is_mla and cfg.is_moe
    assert cfg.extra == {"auto_map": V3_HUB["auto_map"], "torch_dtype": "bfloat16"}
    out = cfg.to_hf()
    for key, value in V3_HUB.items():
        assert out[key] == value, key
    assert ModelConfig.from_hf(out) == cfg


def test_new_style_rope_parameters_are_read():
    cfg = ModelConfig.from_hf({"model_type": "deepseek_v3", "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0, "original_max_position_embeddings": 512}})
    assert cfg.rope_theta == 5000.0 and cfg.rope_type == "yarn" and cfg.rope_scaling["factor"] == 8.0
    plain = ModelConfig.from_hf({"model_type": "deepseek_v3", "rope_parameters": {"rope_type": "default",
                                                                                 "rope_theta": 123.0}})
    assert plain.rope_scaling is None and plain.rope_theta == 123.0


def test_missing_fields_take_the_model_types_defaults():
    v2 = ModelConfig.from_hf({"model_type": "deepseek_v2", "num_experts_per_tok": 6})
    assert (v2.topk_method, v2.scoring_func, v2.norm_topk_prob, v2.routed_scaling_factor) == (
        "greedy", "softmax", False, 1.0)
    v3 = ModelConfig.from_hf({"model_type": "deepseek_v3"})
    assert (v3.topk_method, v3.scoring_func, v3.n_group) == ("noaux_tc", "sigmoid", 8)
    llama = ModelConfig.from_hf({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
                                 "intermediate_size": 128, "num_hidden_layers": 2})
    assert not llama.is_moe and not llama.is_mla and llama.attn_head_dim == 16


def test_transformers_reads_what_we_write(tmp_path):
    from transformers import AutoConfig

    for name in ("tiny-v3", "tiny-v2", "tiny-llm", "deepseek-v3"):
        cfg = ModelConfig.preset(name)
        cfg.save(tmp_path / name)
        hf = AutoConfig.from_pretrained(tmp_path / name)
        assert hf.model_type == cfg.model_type
        assert hf.hidden_size == cfg.hidden_size and hf.num_hidden_layers == cfg.num_hidden_layers


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("overrides, message", [
    ({"model_type": "gpt2"}, "unknown model_type 'gpt2'"),
    ({"n_routed_experts": 10, "n_group": 4}, "n_routed_experts (10) must be divisible by n_group (4)"),
    ({"topk_group": 5, "n_group": 4}, "topk_group must be in [1, n_group=4]"),
    ({"num_experts_per_tok": 9, "n_routed_experts": 16, "n_group": 4, "topk_group": 2},
     "num_experts_per_tok (9) exceeds the 8 experts in topk_group=2 groups of 4"),
    ({"qk_rope_head_dim": 15}, "qk_rope_head_dim must be even for interleaved RoPE"),
    ({"rope_scaling": {"type": "ntk-by-parts", "factor": 2}}, "unknown rope type 'ntk-by-parts'"),
    ({"rope_scaling": {"type": "yarn", "factor": 0.5}}, "rope_scaling.factor must be a number >= 1"),
    ({"topk_method": "top2"}, "unknown topk_method 'top2'"),
    ({"scoring_func": "softmax"}, "topk_method 'noaux_tc' needs scoring_func 'sigmoid'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, "must be a multiple of num_key_value_heads"),
    ({"first_k_dense_replace": 9}, "first_k_dense_replace (9) must be in [0, num_hidden_layers=4]"),
    ({"engram_layer_ids": [7]}, "engram_layer_ids [7] out of range [0, 4)"),
    ({"engram_layer_ids": [1], "engram_dim_per_ngram": 100, "engram_heads": 8},
     "engram_dim_per_ngram (100) must be divisible by engram_heads (8)"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quant_method 'gptq' is not supported"),
    ({"vocab_size": 0}, "vocab_size must be an integer >= 1, got 0"),
])
def test_bad_configs_fail_clearly(overrides, message):
    with pytest.raises(ConfigError) as info:
        ModelConfig.preset("tiny-v3", **overrides)
    assert message in str(info.value)


def test_mtp_needs_v3_and_files_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="needs model_type deepseek_v3"):
        ModelConfig.preset("tiny-v2", num_nextn_predict_layers=1)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset 'v9'"):
        ModelConfig.preset("v9")


# One bad value of config.json at a time (on top of the tiny-v3 preset), and the words the error must hold:
# the field and the value as given. Each used to load silently or fail with a raw Python error.
MALFORMED = [
    ({"rope_scaling": "yarn"}, "rope_scaling must be an object or null, got 'yarn'"),  # was AttributeError
    ({"kv_lora_rank": None}, "kv_lora_rank must be an integer >= 1, got None"),  # was TypeError
    ({"first_k_dense_replace": None}, "first_k_dense_replace must be an integer >= 0, got None"),  # TypeError
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": ["128", 128]}},
     "quantization_config.weight_block_size must be two positive integers, got ['128', 128]"),  # TypeError
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128.5, 128]}},
     "weight_block_size must be two positive integers, got [128.5, 128]"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": None}},
     "weight_block_size must be two positive integers, got None (per-tensor FP8 is not supported)"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}, "got [128]"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, "quantization_config.fmt 'e5m2'"),
    ({"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}},
     "quantization_config.activation_scheme 'static' is not supported"),
    ({"quantization_config": "fp8"}, "quantization_config must be an object or null, got 'fp8'"),
    ({"rope_theta": "abc"}, "rope_theta must be a finite number > 0, got 'abc'"),  # was a bare float() error
    ({"rope_theta": -5}, "rope_theta must be a finite number > 0, got -5"),  # crashed later, in sampling
    ({"rope_theta": float("nan")}, "rope_theta must be a finite number > 0, got nan"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a finite number > 0, got -1"),  # accepted
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a finite number > 0, got 0"),
    ({"intermediate_size": 0}, "intermediate_size must be an integer >= 1, got 0"),  # accepted
    ({"n_routed_experts": 0}, "n_routed_experts must be an integer >= 1 or null, got 0"),  # passed `info`
    ({"vocab_size": True}, "vocab_size must be an integer >= 1, got True"),
    ({"hidden_size": 128.0}, "hidden_size must be an integer >= 1, got 128.0"),
    ({"num_hidden_layers": "4"}, "num_hidden_layers must be an integer >= 1, got '4'"),
    ({"max_position_embeddings": -1}, "max_position_embeddings must be an integer >= 1, got -1"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be an integer >= 1, got 0"),
    ({"initializer_range": -0.1}, "initializer_range must be a finite number >= 0, got -0.1"),
    ({"attention_dropout": 1.5}, "attention_dropout must be a finite number >= 0 and < 1, got 1.5"),
    ({"routed_scaling_factor": 0}, "routed_scaling_factor must be a finite number > 0, got 0"),
    ({"aux_loss_alpha": -1}, "aux_loss_alpha must be a finite number >= 0, got -1"),
    ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false, got 'no'"),
    ({"norm_topk_prob": 1}, "norm_topk_prob must be true or false, got 1"),
    ({"use_cache": None}, "use_cache must be true or false, got None"),
    ({"hidden_act": 5}, "hidden_act must be a string, got 5"),
    ({"topk_method": None}, "topk_method must be a string, got None"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok must be an integer >= 1 or null, got 0"),
    ({"num_experts_per_tok": None}, "num_experts_per_tok must be in [1, n_routed_experts=16], got None"),
    ({"n_group": 0}, "n_group must be an integer >= 1 or null, got 0"),
    ({"topk_group": None}, "topk_group must be in [1, n_group=4], got None"),
    ({"n_shared_experts": -1}, "n_shared_experts must be an integer >= 0 or null, got -1"),
    ({"moe_intermediate_size": 0}, "moe_intermediate_size must be an integer >= 1, got 0"),
    ({"moe_layer_freq": 0}, "moe_layer_freq must be an integer >= 1, got 0"),
    ({"ep_size": 0}, "ep_size must be an integer >= 1, got 0"),
    ({"pretraining_tp": 0}, "pretraining_tp must be an integer >= 1, got 0"),
    ({"q_lora_rank": 0}, "q_lora_rank must be an integer >= 1 or null, got 0"),
    ({"v_head_dim": None}, "v_head_dim must be an integer >= 1, got None"),
    ({"qk_nope_head_dim": -8}, "qk_nope_head_dim must be an integer >= 1, got -8"),
    ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers must be an integer >= 0, got -1"),
    ({"bos_token_id": -1}, "bos_token_id must be an integer >= 0 or null, got -1"),
    ({"eos_token_id": "x"}, "eos_token_id must be an integer >= 0, a non-empty list of them or null, got 'x'"),
    ({"eos_token_id": []}, "eos_token_id must be an integer >= 0, a non-empty list of them or null, got []"),
    ({"rope_scaling": {"type": 3}}, "unknown rope type 3 in rope_scaling"),
    ({"rope_scaling": {"type": "yarn", "factor": "4"}}, "rope_scaling.factor must be a number >= 1 for yarn, got '4'"),
    ({"rope_scaling": {"type": "yarn", "factor": 4, "beta_fast": "fast"}},
     "rope_scaling.beta_fast must be a finite number > 0 or null, got 'fast'"),
    ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 0}},
     "rope_scaling.original_max_position_embeddings must be an integer >= 1 or null, got 0"),
    ({"rope_scaling": {"type": "yarn", "factor": 4, "mscale_all_dim": -1}},
     "rope_scaling.mscale_all_dim must be a finite number >= 0 or null, got -1"),
    ({"rope_parameters": "yarn"}, "rope_parameters must be an object, got 'yarn'"),
    ({"engram_layer_ids": "1"}, "engram_layer_ids must be a list of integers, got '1'"),
    ({"engram_layer_ids": [1], "engram_table_size": [97, "x"]},
     "engram_table_size must be a list of integers, got [97, 'x']"),
    ({"engram_layer_ids": [1], "engram_max_ngram": 1}, "engram_max_ngram must be an integer >= 2, got 1"),
    ({"engram_layer_ids": [1], "engram_kernel": 0}, "engram_kernel must be an integer >= 1, got 0"),
    ({"engram_layer_ids": [1], "engram_pad_id": 2000}, "Engram's pad id 2000 (engram_pad_id, else pad_token_id"),
    ({"engram_layer_ids": [1], "eos_token_id": [1024]}, "Engram's pad id 1024"),
]


@pytest.mark.parametrize("bad, message", MALFORMED, ids=[str(m[0]) for m in MALFORMED])
def test_malformed_config_json_values_are_named(tmp_path, bad, message):
    raw = {**PRESETS["tiny-v3"], **bad}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf(tmp_path)
    assert message in str(info.value)


def test_a_malformed_config_is_reported_by_the_cli_in_words(tmp_path, capsys):
    from seekformer.cli import main

    (tmp_path / "config.json").write_text(json.dumps({**PRESETS["tiny-v3"], "rms_norm_eps": -1}))
    assert main(["info", str(tmp_path)]) == 2
    assert "rms_norm_eps must be a finite number > 0, got -1" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object, got list"):
        ModelConfig.from_hf(tmp_path)


def test_well_formed_values_of_every_kind_still_load():
    cfg = ModelConfig.from_hf({**PRESETS["tiny-v3"], "rope_theta": 10000, "rms_norm_eps": 1e-5,
                               "eos_token_id": [1, 2], "pad_token_id": None, "n_shared_experts": None,
                               "attention_dropout": 0.0, "quantization_config": {"quant_method": "fp8"},
                               "rope_scaling": {"type": "yarn", "factor": 4, "beta_fast": 32, "mscale": None}})
    assert cfg.eos_token_id == [1, 2] and cfg.rope_type == "yarn"
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
