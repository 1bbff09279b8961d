"""`seekformer info --parallel`: the memory and communication arithmetic against hand counts."""

from __future__ import annotations

import pytest

from seekformer import cli
from seekformer.config import ModelConfig
from seekformer.distributed.memory import parallel_footprint, parse_layout


def _tiny() -> ModelConfig:
    return ModelConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=32,
                       n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=1,
                       topk_method="noaux_tc", scoring_func="sigmoid", first_k_dense_replace=1,
                       n_shared_experts=1, num_nextn_predict_layers=0, vocab_size=256)


def test_footprint_hand_counted():
    config = _tiny()
    f = parallel_footprint(config, dp=2, ep=4, tokens_per_rank=100)
    experts = 8 * (2 * 32 * 64 + 64 * 32)  # one MoE layer: gate_up [E, 2I, H] + down [E, H, I]
    assert f.expert_params == experts
    assert f.weights_bytes == f.grads_bytes == f.params * 4 / 8
    assert f.optimizer_bytes == 2 * f.weights_bytes
    # one MoE layer, 100 tokens, K=2 experts of which 3 in 4 on other ranks, 64 values of 2 bytes, 4 passes
    assert f.all_to_all_bytes == pytest.approx(100 * 2 * 0.75 * 64 * 2 * 4)
    # n_group == ep: each token goes to topk_group=1 group, on another rank 3 times in 4
    assert f.all_to_all_node_limited_bytes == pytest.approx(100 * 1 * 0.75 * 64 * 2 * 4)
    dense = f.params - experts
    assert f.reduce_scatter_bytes == pytest.approx((dense * 7 / 8 + experts / 4 * 1 / 2) * 4)
    assert f.allgather_bytes == pytest.approx(2 * f.reduce_scatter_bytes)


def test_footprint_counts_engram_tables_replicated():
    config = _tiny().replace(engram_layer_ids=[1], engram_heads=2, engram_dim_per_ngram=16,
                             engram_table_size=[1000, 1000], engram_max_ngram=3)
    plain, f = parallel_footprint(_tiny(), dp=2, ep=4, tokens_per_rank=100), parallel_footprint(config, 2, 4, 100)
    rows = f.replicated_params // 8  # [sum of 4 primes (2 orders x 2 heads) >= 1000, 16 / 2 values]
    assert f.replicated_params == rows * 8 and 4000 <= rows < 4100
    sharded = f.params - f.replicated_params  # the rest of the Engram module is sharded like any block
    assert f.weights_bytes == (sharded / 8 + rows * 8) * 4
    assert f.optimizer_bytes == 2 * f.weights_bytes
    # 800 tokens in the global batch, 4 lookups each: at most 3200 of the table's rows in the gradient
    assert f.grads_bytes == (sharded / 8 + 3200 * 8) * 4
    # from each of 7 other ranks: 100 tokens x 4 rows of 8 fp32 values and an int64 index
    assert f.sparse_gather_bytes == 7 * 100 * 4 * (8 * 4 + 8)
    # the table is neither gathered nor reduced by FSDP: the rest of the Engram module is
    engram_dense = sharded - plain.params
    assert f.reduce_scatter_bytes == pytest.approx(plain.reduce_scatter_bytes + engram_dense * 7 / 8 * 4)
    assert f.gathered_bytes == plain.gathered_bytes + engram_dense * 4  # layer 1 is the largest block


def test_parse_layout():
    assert parse_layout("dp=8,ep=4") == (8, 4) and parse_layout("ep=2") == (1, 2)
    with pytest.raises(ValueError, match="expected dp=N,ep=M"):
        parse_layout("dp=0")
    with pytest.raises(ValueError, match="expected dp=N,ep=M"):
        parse_layout("tp=2")


def test_info_parallel_prints_the_table(capsys):
    assert cli.main(["info", "deepseek-v3", "--parallel", "dp=32,ep=8"]) == 0
    out = capsys.readouterr().out
    assert "dp=32 x ep=8 = 256 ranks" in out and "optimizer" in out and "all-to-all" in out
    assert cli.main(["info", "deepseek-v3", "--parallel", "ep=7"]) == 2
    assert "ep=7 does not divide the model's 256 experts" in capsys.readouterr().err
