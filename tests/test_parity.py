"""Logits parity with the transformers reference on tiny random models (float32)."""

import pytest
import torch
from conftest import randomize_norms_and_bias
from hf_models import VOCAB, hf_model

from seekformer import ModelConfig, load_model

TOL = 1e-4
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

CASES = {
    "v3-qlora-groups": ("v3", {}),
    "v3-no-qlora": ("v3", {"q_lora_rank": None}),
    "v3-no-groups": ("v3", {"n_group": 1, "topk_group": 1}),
    "v3-yarn": ("v3", {"rope_parameters": YARN}),
    "v3-yarn-mscale1": ("v3", {"rope_parameters": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}}),
    "v3-yarn-attention-factor": ("v3", {"rope_parameters": {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5}}),
    "v3-not-interleaved": ("v3", {"rope_interleave": False}),
    "v3-unnormalised-topk": ("v3", {"norm_topk_prob": False}),
    "v3-top1": ("v3", {"num_experts_per_tok": 1}),  # normalised: each gate weight is routed_scaling_factor
    "v3-top1-unnormalised": ("v3", {"num_experts_per_tok": 1, "norm_topk_prob": False}),
    "v2-greedy": ("v2", {}),
    "v2-group-limited": ("v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                                "q_lora_rank": 24, "routed_scaling_factor": 16.0}),
    "v2-yarn": ("v2", {"rope_parameters": YARN}),
    "llama-gqa": ("llama", {}),
}


def _pair(tmp_path, kind, overrides):
    reference = hf_model(kind, **overrides)
    randomize_norms_and_bias(reference)
    reference.save_pretrained(tmp_path)
    return reference, load_model(tmp_path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    kind, overrides = CASES[case]
    reference, ours = _pair(tmp_path, kind, overrides)
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape == (2, 64, VOCAB)
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["v3", "v2", "llama"])
def test_left_padded_batch_matches_unpadded_and_reference(tmp_path, kind):
    reference, ours = _pair(tmp_path, kind, {})
    gen = torch.Generator().manual_seed(4)
    lengths = [64, 41]
    ids = torch.randint(2, VOCAB, (2, 64), generator=gen)
    mask = torch.ones(2, 64, dtype=torch.long)
    mask[1, : 64 - lengths[1]] = 0  # left padding
    ids[1, : 64 - lengths[1]] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        expected = reference(ids, attention_mask=mask, position_ids=positions).logits
        alone = ours(ids[1:, 64 - lengths[1]:])
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= TOL
    assert (got[1, 64 - lengths[1]:] - alone[0]).abs().max().item() <= TOL
    assert torch.isfinite(got).all()


def test_right_padded_batch_matches_unpadded(tmp_path):
    _, ours = _pair(tmp_path, "v3", {})
    ids = torch.randint(2, VOCAB, (2, 48), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, 30:] = 0
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        alone = ours(ids[:1, :30])
    assert (got[0, :30] - alone[0]).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", ["v3", "v2", "llama"])
def test_save_pretrained_loads_in_transformers(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    reference, ours = _pair(tmp_path / "src", kind, {"rope_parameters": YARN} if kind != "llama" else {})
    ours.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (reloaded(ids).logits - ours(ids)).abs().max().item() <= TOL
        assert (reloaded(ids).logits - reference(ids).logits).abs().max().item() <= TOL
    assert ModelConfig.from_hf(tmp_path / "out") == ours.config
