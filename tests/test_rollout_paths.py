"""Decode-path shortcuts that must not change what generation computes: prompts shared among rows
(the same tokens as each row prefilled alone, up to the rounding of kernels picked by row count),
the inference RMSNorm (the same values as the training formula)."""

import pytest
import torch

from seekformer import ModelConfig, Transformer
from seekformer.inference import generate
from seekformer.inference import generation as generation_module
from seekformer.model.layers import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_prompts_give_the_tokens_of_separate_prefills(dtype, monkeypatch, one_thread):
    """GRPO's layout: each prompt repeated for its group, prompts of unequal length (left padding),
    sampled at temperature 1 with one seed: the prefill runs once per distinct prompt, and every row's
    tokens and finish reasons equal those of the rows each run through their own prefill."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny-v3")).to(dtype).eval()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 1024, (n,), generator=gen).tolist() for n in (5, 9, 7)]
    rows = [p for p in prompts for _ in range(4)]
    rows.insert(5, prompts[1][:4])  # a distinct prompt inside a group, sharing a prefix with it
    prefilled = []
    original = generation_module._prefill
    monkeypatch.setattr(generation_module, "_prefill",
                        lambda m, p, *a, **k: prefilled.append(p.ids.shape[0]) or original(m, p, *a, **k))
    shared = generate(model, rows, max_new_tokens=10, temperature=1.0, seed=11, stop_tokens=[3])
    alone = generate(model, rows, max_new_tokens=10, temperature=1.0, seed=11, stop_tokens=[3],
                     share_prompts=False)
    assert prefilled == [4, 13]  # 4 distinct prompts, then all 13 rows
    assert shared.tokens == alone.tokens and shared.finish_reasons == alone.finish_reasons
    assert len({tuple(t) for t in shared.tokens[:4]}) > 1  # the rows of a group still sample their own tokens
    greedy = generate(model, rows, max_new_tokens=6, stop_tokens=[])
    assert greedy.tokens == generate(model, rows, max_new_tokens=6, stop_tokens=[], share_prompts=False).tokens
    with pytest.raises(ValueError, match="share_prompts"):
        generate(model, rows, max_new_tokens=2, share_prompts="yes")


def test_shared_prefill_on_wide_bf16_models_stays_within_rounding(monkeypatch, one_thread):
    """Where the shared prefill has few rows and the full batch many, a bf16 CPU model's products may
    take different kernels (the few-row kernel against oneDNN): the first token's logits then differ
    by float32 summation order only, within bf16 rounding of their scale, not by the computation."""
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny-v3", hidden_size=1024, intermediate_size=1024, moe_intermediate_size=512,
                                num_hidden_layers=2)
    model = Transformer(config).to(torch.bfloat16).eval()
    gen = torch.Generator().manual_seed(5)
    rows = [p for p in (torch.randint(2, 1024, (12,), generator=gen).tolist() for _ in range(2)) for _ in range(8)]
    first_logits = []
    original = generation_module.next_tokens
    monkeypatch.setattr(generation_module, "next_tokens",
                        lambda logits, *a, **k: first_logits.append(logits.double()) or original(logits, *a, **k))
    for share in (True, False):
        generate(model, rows, max_new_tokens=1, stop_tokens=[], share_prompts=share)
    shared, alone = first_logits
    assert (shared - alone).abs().max() <= 2**-6 * alone.abs().max()


def test_distinct_prompts_tell_padding_from_a_pad_token():
    """A row whose first real token is the pad id is not the row padded there."""
    model = Transformer(ModelConfig.preset("tiny-v3")).eval()
    prompts = generation_module._prepare_prompts(model, [[0, 5, 6], [5, 6], [5, 6]], None, pad_token_id=0)
    distinct, row_of = generation_module._distinct_prompts(prompts)
    assert distinct.ids.shape[0] == 2 and row_of[1] == row_of[2] != row_of[0]
    assert generation_module._distinct_prompts(
        generation_module._prepare_prompts(model, [[1, 2], [2, 1]], None, None)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_inference_rmsnorm_equals_the_training_formula(dtype):
    """Without autograd RMSNorm runs PyTorch's fused norm (the same values), and for bf16 on CPU the
    few-row kernel library's (float32 statistics summed in its own order: at most one bf16 rounding
    step off, and rarely; over these 120 rows of 5 widths, strided rows included, none)."""
    for dim in (7, 96, 160, 512, 1408):
        norm = RMSNorm(dim, eps=1e-6)
        with torch.no_grad():
            norm.weight.normal_(1.0, 0.1, generator=torch.Generator().manual_seed(dim))
        norm = norm.to(dtype)
        wide = (torch.randn(8, 3, dim + 5, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
        for x in (wide[..., :dim].contiguous(), wide[..., 5:]):  # contiguous rows, strided rows
            formula = norm(x).detach()  # autograd on: the formula
            with torch.no_grad():
                fast = norm(x)
            if dtype != torch.bfloat16:
                assert torch.equal(fast, formula)
            else:
                differ = fast != formula
                assert float(differ.float().mean()) <= 0.01
                torch.testing.assert_close(fast.float(), formula.float(), rtol=2 ** -7, atol=0)
