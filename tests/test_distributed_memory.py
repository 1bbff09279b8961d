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
