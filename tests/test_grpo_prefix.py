"""GRPO's shared-prompt log-prob passes (`training/grpo_prefix.py`) against every row run alone."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_norms_and_bias

from seekformer.config import PRESETS, ModelConfig
from seekformer.model.transformer import Transformer
from seekformer.training.cross_entropy import token_logprobs
from seekformer.training.grpo_prefix import PrefixBatch, completion_targets, prefix_logprobs

V3 = {**PRESETS["tiny-v3"], "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
      "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "kv_lora_rank": 16, "q_lora_rank": 24,
      "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8,
      "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "vocab_size": 50, "num_nextn_predict_layers": 0}
GQA = {**PRESETS["tiny-llm"], "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50}

# two groups of 3 rows (prompts of 5 and 3 tokens) and a row whose prompt appears once; completions
# of unequal lengths, among them one token (no completion input) and none
PROMPTS = [[3, 4, 5, 6, 7]] * 3 + [[8, 9, 10]] * 3 + [[11, 12, 13, 14]]
COMPLETIONS = [[20, 21, 22, 23], [24], [25, 26, 27, 28, 29, 30], [31, 32], [], [33, 34, 35], [36, 37, 38]]


def _model(fields: dict, dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf(fields))
    randomize_norms_and_bias(model)
    return model.to(dtype).train()


def _each_row_alone(model, prompts, completions, temperature):
    """[B, T] log-probs of each completion from `hidden_states` of its prompt + completion alone."""
    T = max(len(c) for c in completions)
    rows = []
    for p, c in zip(prompts, completions):
        row = torch.zeros(T)
        if c:
            h = model.hidden_states(torch.tensor([p + c]))[0, len(p) - 1:len(p) + len(c) - 1]
            row = torch.cat((token_logprobs(h, model.lm_head.weight, torch.tensor(c), temperature), row[len(c):]))
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("fields", [V3, GQA], ids=["mla-moe", "gqa"])
def test_prefix_logprobs_and_gradients_equal_each_row_alone(fields, one_thread):
    """Log-probs and the gradients of a weighted sum of them equal running every prompt +
    completion separately (each prompt runs once: its gradients sum over its rows). A float64
    model; the output head's softmax is float32 in both, hence the float32 tolerances."""
    model = _model(fields, torch.float64)
    weights = torch.randn(len(PROMPTS), max(map(len, COMPLETIONS)))
    batch = PrefixBatch.build(PROMPTS, COMPLETIONS)
    assert batch.prompt_shape == (3, 5) and batch.n_prompt_tokens == 12  # each distinct prompt once
    assert batch.tokens.shape[0] == 12 + sum(max(len(c) - 1, 0) for c in COMPLETIONS)

    got = prefix_logprobs(model, batch, temperature=0.7)
    (got * weights).sum().backward()
    got_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    expected = _each_row_alone(model, PROMPTS, COMPLETIONS, 0.7)
    (expected * weights).sum().backward()

    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert torch.all(got[4] == 0) and torch.all(got[1, 1:] == 0)  # padding
    names = [name for name, p in model.named_parameters() if p.grad is not None]
    assert sorted(got_grads) == sorted(names)
    for name in names:  # float32 rounding of the head, relative to each gradient's scale
        expected_grad = dict(model.named_parameters())[name].grad
        error = (got_grads[name] - expected_grad).abs().max() / expected_grad.abs().max()
        assert error < 1e-6, (name, float(error))


def test_prefix_logprobs_entropy_and_routes_in_bf16(one_thread):
    """Under bf16 autocast (the update's setting) the log-probs and entropies stay within bf16
    rounding of the per-row path, and each MoE layer's routing covers the stream once."""
    model = _model(V3, torch.float32)
    batch = PrefixBatch.build(PROMPTS, COMPLETIONS)
    routes = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, entropy = prefix_logprobs(model, batch, entropy=True, routes=routes)
    with torch.no_grad():
        expected = _each_row_alone(model, PROMPTS, COMPLETIONS, 1.0)
        _, full_entropy = prefix_logprobs(model, batch, entropy=True)
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)
    torch.testing.assert_close(entropy, full_entropy, atol=0.05, rtol=0.05)
    assert list(routes) == ["layers.1"] and routes["layers.1"].indices.shape[0] == batch.tokens.shape[0]


def test_prefix_expert_loads_count_every_row(one_thread):
    """The expert loads of a shared-prompt pass equal the sum over rows run alone (each prompt with
    its completion's inputs): a prompt's tokens count once per row continuing it."""
    model = _model(V3, torch.float64)
    routes = {}
    with torch.no_grad():
        prefix_logprobs(model, PrefixBatch.build(PROMPTS, COMPLETIONS), routes=routes)
        expected = 0
        for p, c in zip(PROMPTS, COMPLETIONS):
            alone = {}
            model.hidden_states(torch.tensor([p + c[:-1]]), routes=alone)
            expected = expected + alone["layers.1"].counts
    assert torch.equal(routes["layers.1"].counts, expected)


def test_prefix_batch_bad_input():
    with pytest.raises(ValueError, match="one prompt per completion"):
        PrefixBatch.build([[1, 2]], [[3], [4]])
    with pytest.raises(ValueError, match="empty prompt"):
        PrefixBatch.build([[]], [[3]])
    dropout = _model({**V3, "attention_dropout": 0.1}, torch.float32)
    with pytest.raises(ValueError, match="Engram layers or attention dropout"):
        prefix_logprobs(dropout, PrefixBatch.build([[1, 2]], [[3, 4]]))


def test_completion_targets_pad_with_ignore_index():
    """The one builder of GRPO's completion targets: tokens left-aligned, -100 after them, as wide
    as asked (default the longest completion, at least 1); the prefix batch uses the same targets."""
    assert completion_targets([[5, 6], [7], []]).tolist() == [[5, 6], [7, -100], [-100, -100]]
    assert completion_targets([[5], []], width=3).tolist() == [[5, -100, -100], [-100, -100, -100]]
    assert completion_targets([[], []]).tolist() == [[-100], [-100]]
    assert completion_targets([]).shape == (0, 1)
    with pytest.raises(ValueError, match="narrower than the longest completion"):
        completion_targets([[1, 2, 3]], width=2)
    batch = PrefixBatch.build([[1, 2], [1, 2]], [[3, 4, 5], [6]], width=4)
    assert torch.equal(batch.targets, completion_targets([[3, 4, 5], [6]], width=4))
