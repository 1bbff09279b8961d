"""AdamW with bf16 moments (`optim.moment_dtype = "bf16"`, DeepSeek-V3's recipe) against a float64
hand computation, its state memory, and exact resume with the Engram tables' SparseAdam beside it."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import kill_at, step_losses, tiny_run_config
from safetensors.torch import load_file

from seekformer.config import ModelConfig
from seekformer.model.transformer import Transformer
from seekformer.training.adamw_moments import AdamWLowPrecisionMoments, optimizer_state_bytes
from seekformer.training.checkpointing import STATE_TENSORS, latest_checkpoint
from seekformer.training.optim import build_optimizer
from seekformer.training.pretrain import Trainer
from seekformer.training.run_config import OptimSection, RunConfig, RunConfigError

QUIET = {"progress": False, "echo": lambda _: None}
LR, BETAS, EPS = 3e-2, (0.9, 0.95), 1e-8


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """float64 -> nearest bf16 value (round to nearest even on the float64 bits, independent of torch's
    casts), returned as float64."""
    bits = x.view(torch.int64)
    lower = bits & ((1 << 45) - 1)  # float64 has 52 mantissa bits, bf16 7: drop 45
    half = 1 << 44
    keep = bits >> 45
    up = (lower > half) | ((lower == half) & ((keep & 1) == 1))
    return ((keep + up.long()) << 45).view(torch.float64)


def _adamw64(params, grads, wds, steps, round_moments: bool):
    """Hand-computed AdamW in float64: p *= 1 - lr wd; m, v updated; p -= lr/bc1 m / (sqrt(v)/sqrt(bc2) + eps);
    the stored m and v rounded to bf16 after each update when `round_moments`."""
    p = [x.double().clone() for x in params]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    for t in range(1, steps + 1):
        for i, (g, wd) in enumerate(zip(grads[t - 1], wds)):
            g = g.double()
            m_new = BETAS[0] * m[i] + (1 - BETAS[0]) * g
            v_new = BETAS[1] * v[i] + (1 - BETAS[1]) * g * g
            p[i] = p[i] * (1 - LR * wd)
            denom = v_new.sqrt() / math.sqrt(1 - BETAS[1] ** t) + EPS
            p[i] = p[i] - LR / (1 - BETAS[0] ** t) * m_new / denom
            m[i], v[i] = (_bf16(m_new), _bf16(v_new)) if round_moments else (m_new, v_new)
    return p, m, v


def test_bf16_moments_match_float64_adamw_with_moments_rounded_after_each_update() -> None:
    gen = torch.Generator().manual_seed(0)
    # magnitudes over six decades, so that bf16's 8 significant bits matter at every scale
    params = [torch.randn(40, 50, generator=gen) * torch.logspace(-3, 0, 50), torch.randn(37, generator=gen)]
    wds = [0.1, 0.0]
    steps = 6
    grads = [[torch.randn(p.shape, generator=gen) * torch.logspace(-4, 2, p.shape[-1]) for p in params]
             for _ in range(steps)]
    live = [torch.nn.Parameter(p.clone()) for p in params]
    opt = AdamWLowPrecisionMoments([{"params": [live[0]], "weight_decay": wds[0]},
                                    {"params": [live[1]], "weight_decay": wds[1]}], lr=LR, betas=BETAS, eps=EPS)
    for t in range(steps):
        for p, g in zip(live, grads[t]):
            p.grad = g.clone()
        opt.step()
    ref_p, ref_m, ref_v = _adamw64(params, grads, wds, steps, round_moments=True)
    unrounded_p, _, _ = _adamw64(params, grads, wds, steps, round_moments=False)
    for i, p in enumerate(live):
        state = opt.state[p]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16 and p.dtype == torch.float32
        assert state["step"].item() == steps
        for got, ref in ((state["exp_avg"], ref_m[i]), (state["exp_avg_sq"], ref_v[i])):
            got = got.double()
            # the float32 intermediate can differ from float64 only where it lands on a rounding tie
            assert (got == ref).double().mean() > 0.999
            assert ((got - ref).abs() <= 2**-7 * ref.abs()).all()  # one bf16 ulp at most
        diff = (p.detach().double() - ref_p[i]).abs()
        # float32 rounding of each step's weight and update: a few float32 ulps of |p| + the updates
        assert (diff <= 2**-20 * (ref_p[i].abs() + LR * steps)).all()
        effect = (unrounded_p[i] - ref_p[i]).abs().max()  # what the rounding of the moments changes
        assert effect > 100 * diff.max()


def test_bf16_moments_halve_the_optimizer_state_of_a_model() -> None:
    config = ModelConfig.from_hf({"model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 32,
                                  "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
                                  "first_k_dense_replace": 1, "n_routed_experts": 4, "num_experts_per_tok": 2,
                                  "n_group": 1, "topk_group": 1, "num_attention_heads": 2, "kv_lora_rank": 16,
                                  "q_lora_rank": 24, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8})
    torch.manual_seed(0)
    model = Transformer(config)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sizes = {}
    for dtype in ("fp32", "bf16"):
        opt = build_optimizer(model, OptimSection(moment_dtype=dtype))
        model(torch.randint(0, 64, (2, 8))).float().pow(2).mean().backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        sizes[dtype] = optimizer_state_bytes(opt)
        n_tensors = len(opt.state)
        assert sizes[dtype] == 2 * n * (4 if dtype == "fp32" else 2) + 4 * n_tensors  # + a float32 step each
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sizes["bf16"] / sizes["fp32"] == pytest.approx(0.5, abs=1e-3)


def test_memory_lower_bound_counts_bf16_moments() -> None:
    from seekformer.training.memory import training_bytes_lower_bound

    config = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 2, "num_attention_heads": 2})
    assert training_bytes_lower_bound(config, 1000, 10)[0] == 16 * 1000
    assert training_bytes_lower_bound(config, 1000, 10, moment_bytes=2)[0] == 12 * 1000


def test_moment_dtype_is_checked() -> None:
    with pytest.raises(RunConfigError, match="optim.moment_dtype must be one of fp32, bf16, got 'fp16'"):
        RunConfig().apply_overrides(["optim.moment_dtype='fp16'"])
    with pytest.raises(RunConfigError, match="optim.moment_dtype must be one of"):
        build_optimizer(torch.nn.Linear(2, 2), OptimSection(moment_dtype="fp8"))


@pytest.mark.usefixtures("one_thread")
def test_bf16_moment_run_resumes_exactly_with_the_engram_optimizer_untouched(data_dir, tmp_path) -> None:
    sets = ("model.engram_layer_ids=[1]", "model.engram_heads=2", "model.engram_dim_per_ngram=16",
            "model.engram_table_size=[2048, 2048]", "optim.moment_dtype='bf16'", "run.steps=6", "run.log_every=1",
            "run.eval_every=3", "run.save_every=3", "data.grad_accum=2", "optim.weight_decay=0.1")
    straight = Trainer(tiny_run_config(data_dir, *sets), tmp_path / "a", **QUIET).train()
    interrupted = Trainer(tiny_run_config(data_dir, *sets), tmp_path / "b", **QUIET)
    assert isinstance(interrupted.optimizer, AdamWLowPrecisionMoments)
    assert isinstance(interrupted.engram_optimizer, torch.optim.SparseAdam)
    kill_at(interrupted, 5)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt.name == "step_000003"
    tensors = load_file(str(ckpt / STATE_TENSORS))
    moments = {k: v for k, v in tensors.items() if k.endswith((".exp_avg", ".exp_avg_sq"))}
    assert {v.dtype for k, v in moments.items() if k.startswith("optimizer.")} == {torch.bfloat16}
    assert {v.dtype for k, v in moments.items() if k.startswith("engram_optimizer.")} == {torch.float32}

    resumed = Trainer.resume(tmp_path / "b", **QUIET)
    assert {s[k].dtype for s in resumed.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")} == {torch.bfloat16}
    for key, value in moments.items():  # the loaded moments are the saved ones, bit for bit
        name, index, moment = key.split(".")
        opt = resumed.optimizers[name]
        param = [p for g in opt.param_groups for p in g["params"]][int(index)]
        assert torch.equal(opt.state[param][moment], value)
    result = resumed.train()
    assert step_losses(tmp_path / "b") == step_losses(tmp_path / "a")  # exactly equal, every step
    a = load_file(str(straight.final_dir / "model.safetensors"))
    b = load_file(str(result.final_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
