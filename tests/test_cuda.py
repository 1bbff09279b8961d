"""The CUDA paths against the same computation on the CPU (float32) or in float64.

Skipped without a GPU. Each test compares what runs on `DEVICE` with an independent CPU oracle:
float64 for the bf16 grouped-GEMM experts, CPU float32 forwards / `generate` / training losses and
gradients for the rest. bf16 results are judged by the relative Frobenius error against float64 or
float32 (bf16 keeps 8 significant bits: each rounding is off by up to 2^-9 = 0.2%, a few dozen of them
in a row add up to about 1%); float32 results by an absolute error scaled to the reference's largest
value (TF32 stays off: PyTorch's default for matmuls).
"""

import copy
import math

import pytest
import torch
from conftest import kill_at, randomize_norms_and_bias, step_losses, tiny_run_config
from hf_models import V3_BASE, VOCAB
from test_engram_model import _model as _engram_model
from test_generate import _mtp_model

from seekformer import ModelConfig, Transformer, load_model
from seekformer.engram_offload import offload_engram_tables
from seekformer.inference import KVCache, generate
from seekformer.model.moe import Experts, MoE, RouterOutput
from seekformer.serve import Engine, RequestSampling
from seekformer.training.pretrain import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")

DEVICE = torch.device("cuda")
FP32_TOL = 1e-4  # float32 on two devices: summation order only (~1e-6 relative); headroom for deep sums
BF16_TOL = 3e-2  # relative Frobenius error of a bf16 result against float32/float64


def _rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().double().cpu()
    return float((got.detach().double().cpu() - ref).norm() / ref.norm())


def _assert_fp32_close(got: torch.Tensor, ref: torch.Tensor, tol: float = FP32_TOL) -> None:
    ref = ref.detach().float().cpu()
    err = float((got.detach().float().cpu() - ref).abs().max())
    assert err <= tol * max(1.0, float(ref.abs().max())), f"max abs error {err:.3g}"


def _v3(seed: int = 0, **hf) -> Transformer:
    """A tiny V3 (MLA, MoE with groups and bias) with moved norms, a non-zero router bias and a peaked
    output head (argmax far from near-ties)."""
    torch.manual_seed(seed)
    config = ModelConfig.from_hf({"model_type": "deepseek_v3", **V3_BASE, "eos_token_id": None, **hf})
    model = Transformer(config).eval()
    randomize_norms_and_bias(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def _prompts(lengths=(9, 3, 40, 1, 17, 25), seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def _padded_batch(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [3, 20] and a mask with a left-padded and a right-padded row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 20), generator=gen)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, :6] = 0
    mask[2, 15:] = 0
    return ids, mask


def _on_device(model: Transformer, dtype: torch.dtype = torch.float32) -> Transformer:
    return copy.deepcopy(model).to(DEVICE, dtype)


# ---------------------------------------------------------------------------- experts (grouped GEMM)
def _routing(n_tokens: int, config: ModelConfig, empty_expert: int, aligned: bool) -> RouterOutput:
    """Distinct experts per token, never `empty_expert` (one group of the GEMM is empty): random, or
    (`aligned`) in turn, so that with n_tokens = 56 every other expert gets 24 rows, a multiple of 8
    (16 bytes of bf16: what torchtitan pads its groups to for this GEMM)."""
    E, K = config.n_routed_experts, config.num_experts_per_tok
    gen = torch.Generator().manual_seed(3)
    others = torch.tensor([e for e in range(E) if e != empty_expert])
    if aligned:
        indices = others[(torch.arange(n_tokens).unsqueeze(1) + torch.arange(K)) % (E - 1)]
    else:
        indices = others[torch.rand(n_tokens, E - 1, generator=gen).argsort(dim=1)[:, :K]]
    weights = torch.rand(n_tokens, K, generator=gen) + 0.1
    counts = torch.zeros(E, dtype=torch.long).scatter_add_(0, indices.flatten(), torch.ones(n_tokens * K,
                                                                                             dtype=torch.long))
    assert not aligned or not (counts % 8).any()
    return RouterOutput(indices, weights, torch.zeros(n_tokens, E), counts)


def _route_to(route: RouterOutput, device, dtype=None) -> RouterOutput:
    weights = route.weights.to(device, dtype or route.weights.dtype)
    return RouterOutput(route.indices.to(device), weights, route.scores.to(device), route.counts.to(device))


@pytest.mark.parametrize("aligned", [False, True], ids=["ragged_groups", "groups_of_8k_rows"])
def test_grouped_mm_experts_match_the_float64_loop(aligned):
    """The bf16 grouped GEMM (picked on its own under autocast and for bf16 weights): outputs and the
    gradients of input and both weight stacks against the autograd loop in float64; an expert without
    tokens gets an exactly zero weight gradient. Group sizes that are not multiples of 8 rows, and ones
    that are (should only the first fail, the GEMM needs its groups padded)."""
    config = ModelConfig.from_hf({"model_type": "deepseek_v3", **V3_BASE})
    torch.manual_seed(0)
    ref = Experts(config).double()
    with torch.no_grad():  # larger than the init std, so the SwiGLU is not nearly linear
        ref.gate_up_proj.normal_(0, 0.2)
        ref.down_proj.normal_(0, 0.2)
    ref.implementation = "autograd_loop"
    N, H, empty = 56, config.hidden_size, 5
    route = _routing(N, config, empty, aligned)
    x = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(N, H, dtype=torch.float64)
    ref_out = ref(x, _route_to(route, "cpu", torch.float64))
    ref_out.backward(grad_out)

    # training: float32 weights and residual stream under bf16 autocast
    experts = copy.deepcopy(ref).float().to(DEVICE)
    experts.implementation = "auto"
    xd = x.detach().float().to(DEVICE).requires_grad_()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        if DEVICE.type == "cuda":
            assert experts.resolve_implementation(xd.device, xd.dtype) == "grouped_mm"
        out = experts(xd, _route_to(route, DEVICE))
    assert out.dtype == torch.float32 and out.device.type == DEVICE.type
    out.backward(grad_out.float().to(DEVICE))
    assert _rel_error(out, ref_out) < BF16_TOL
    assert _rel_error(xd.grad, x.grad) < BF16_TOL
    assert _rel_error(experts.gate_up_proj.grad, ref.gate_up_proj.grad) < BF16_TOL
    assert _rel_error(experts.down_proj.grad, ref.down_proj.grad) < BF16_TOL
    assert not experts.gate_up_proj.grad[empty].any() and not experts.down_proj.grad[empty].any()

    # inference: bf16 weights and activations, no autocast
    experts_bf16 = copy.deepcopy(ref).to(DEVICE, torch.bfloat16)
    experts_bf16.implementation = "auto"
    with torch.no_grad():
        xb = x.detach().to(DEVICE, torch.bfloat16)
        if DEVICE.type == "cuda":
            assert experts_bf16.resolve_implementation(xb.device, xb.dtype) == "grouped_mm"
        out_bf16 = experts_bf16(xb, _route_to(route, DEVICE))
    assert out_bf16.dtype == torch.bfloat16
    assert _rel_error(out_bf16, ref_out) < BF16_TOL


# ---------------------------------------------------------------------------- forward
def test_logits_match_cpu_float32_and_bf16_stays_close():
    """A padded batch (masked SDPA) and an unpadded one (causal SDPA; the CPU takes blocked attention):
    float32 logits and routing as on the CPU; bf16 logits (the CPU's routing replayed, so both pick
    the same experts) within BF16_TOL."""
    ref = _v3()
    model = _on_device(ref)
    ids, mask = _padded_batch()
    real = mask.bool()
    for batch_mask in (mask, None):
        routes: dict = {}
        with torch.no_grad():
            expected = ref.lm_head(ref.hidden_states(ids, batch_mask, routes=routes))
            got_routes: dict = {}
            got = model.lm_head(model.hidden_states(ids.to(DEVICE), None if batch_mask is None else
                                                    batch_mask.to(DEVICE), routes=got_routes))
        keep = real if batch_mask is not None else torch.ones_like(real)
        _assert_fp32_close(got.cpu()[keep], expected[keep])
        flat_keep = keep.flatten()
        for name, route in routes.items():  # padded positions route too, but nothing reads them
            assert torch.equal(got_routes[name].indices.cpu()[flat_keep].sort(dim=1).values,
                               route.indices[flat_keep].sort(dim=1).values), name

    model_bf16 = _on_device(ref, torch.bfloat16)
    routes = {}
    with torch.no_grad():
        expected = ref.lm_head(ref.hidden_states(ids, mask, routes=routes))
        for name, route in routes.items():
            model_bf16.model.layers[int(name.split(".")[1])].mlp.replay_indices = route.indices.to(DEVICE)
        got = model_bf16(ids.to(DEVICE), mask.to(DEVICE))
    assert got.dtype == torch.bfloat16
    assert _rel_error(got.cpu()[real], expected[real]) < BF16_TOL


def test_absorbed_and_naive_decode_match_the_cpu_full_forward():
    """Prefill then token-by-token decode over the latent cache, each MLA path forced, on the device in
    float32: each step's logits equal the CPU's full forward at that position."""
    ref = _v3()
    model = _on_device(ref)
    ids = torch.tensor(_prompts((24,))[0]).unsqueeze(0).expand(2, -1).clone()
    ids[1, :3] = 7  # two different rows
    with torch.no_grad():
        expected = ref(ids)
        for path in ("absorbed", "naive"):
            cache = KVCache.for_model(model, 2, attention_path=path)
            assert cache.device.type == DEVICE.type
            prefill = model(ids[:, :20].to(DEVICE), cache=cache)
            _assert_fp32_close(prefill, expected[:, :20])
            for t in range(20, 24):
                step = model(ids[:, t:t + 1].to(DEVICE), cache=cache)
                _assert_fp32_close(step[:, 0], expected[:, t])


# ---------------------------------------------------------------------------- generate
def test_greedy_generate_matches_cpu_with_each_attention_path_and_mtp_speculation():
    ref = _v3()
    model = _on_device(ref)
    prompts = _prompts()
    expected = generate(ref, prompts, max_new_tokens=12, stop_tokens=[]).tokens
    for path in ("auto", "absorbed", "naive"):
        assert generate(model, prompts, max_new_tokens=12, stop_tokens=[], attention_path=path).tokens == expected
    assert generate(model, prompts, max_new_tokens=12, stop_tokens=[], prefill_chunk=8).tokens == expected

    mtp_ref = _mtp_model(eps=0.5, depth=2)
    mtp_model = _on_device(mtp_ref)
    expected = generate(mtp_ref, prompts, max_new_tokens=20, stop_tokens=[]).tokens
    out = generate(mtp_model, prompts, max_new_tokens=20, stop_tokens=[], speculative="mtp")
    assert out.tokens == expected
    assert 0 < out.stats.acceptance_rate < 1  # both acceptances and rejections happened
    sampled = generate(mtp_model, prompts, max_new_tokens=20, stop_tokens=[], speculative="mtp",
                       temperature=0.8, seed=1)
    assert [len(row) for row in sampled.tokens] == [20] * len(prompts)
    assert all(0 <= t < VOCAB for row in sampled.tokens for t in row)


# ---------------------------------------------------------------------------- training
def _trainer(data_dir, run_dir, device: str, dtype: str) -> Trainer:
    cfg = tiny_run_config(data_dir, f"run.device='{device}'", f"run.dtype='{dtype}'", "run.steps=4",
                          "mtp.depth=1")
    return Trainer(cfg, run_dir, progress=False, echo=lambda msg: None)


def test_training_losses_and_gradients_match_cpu_float32(data_dir, tmp_path):
    """One micro-batch through `Trainer.losses` (main, MTP and balance losses) and backward: float32 on
    the device equals float32 on the CPU, losses, expert loads and every gradient; then a bf16-autocast optimizer step
    on the device (grouped GEMM experts, SDPA) gives the CPU float32 step's loss and gradient norm."""
    cpu = _trainer(data_dir, tmp_path / "cpu", "cpu", "fp32")
    dev = _trainer(data_dir, tmp_path / "dev", DEVICE.type, "fp32")
    dev.model.load_state_dict(cpu.model.state_dict())
    x, y = next(iter(cpu.sampler))
    ref_losses, ref_loads = cpu.losses(x, y, 0.3, with_mtp=True)
    ref_losses["total"].backward()
    losses, loads = dev.losses(x.to(DEVICE), y.to(DEVICE), 0.3, with_mtp=True)
    losses["total"].backward()
    assert set(losses) == set(ref_losses) >= {"loss", "mtp_loss_1", "balance_loss"}
    for key, value in ref_losses.items():
        assert abs(losses[key].item() - value.item()) <= 1e-5 * max(1.0, abs(value.item())), key
    for name, counts in ref_loads.items():
        assert torch.equal(loads[name].cpu(), counts), name
    # float32 summation order alone gives ~1e-6; each parameter is allowed 1e-3 for gradients that are
    # sums of terms cancelling each other, all of them together 1e-4
    ref_params = dict(cpu.model.named_parameters())
    errors, norms = [], []
    for name, param in dev.model.named_parameters():
        ref_grad = ref_params[name].grad
        if ref_grad is None:
            assert param.grad is None, name
            continue
        errors.append(float((param.grad.cpu() - ref_grad).norm()))
        norms.append(float(ref_grad.norm()))
        assert errors[-1] <= 1e-3 * norms[-1] + 1e-8, f"{name}: gradient error {errors[-1]:.3g} of {norms[-1]:.3g}"
    assert math.hypot(*errors) <= 1e-4 * math.hypot(*norms)

    cpu = _trainer(data_dir, tmp_path / "cpu2", "cpu", "fp32")
    bf16 = _trainer(data_dir, tmp_path / "bf16", DEVICE.type, "bf16")
    bf16.model.load_state_dict(cpu.model.state_dict())
    start = {name: p.detach().clone() for name, p in cpu.model.named_parameters()}
    ref_metrics, _ = cpu.train_step()
    metrics, _ = bf16.train_step()
    # measured with bf16 autocast on the CPU: loss 1e-5, gradient norm 7e-4, update 0.08 off
    assert abs(metrics["loss"].item() - ref_metrics["loss"].item()) < 2e-3 * ref_metrics["loss"].item()
    assert abs(metrics["grad_norm"].item() - ref_metrics["grad_norm"].item()) < 2e-2 * ref_metrics["grad_norm"].item()
    # AdamW's first update is about lr * sign(gradient): entries with gradients near zero may flip
    ref_update = torch.cat([(cpu.model.get_parameter(name).detach() - p0).flatten() for name, p0 in start.items()])
    update = torch.cat([(bf16.model.get_parameter(name).detach().cpu() - p0).flatten() for name, p0 in start.items()])
    assert _rel_error(update, ref_update) < 0.3


def test_training_run_saves_resumes_and_its_checkpoint_loads_on_the_cpu(data_dir, tmp_path):
    """`Trainer.train` on the device in bf16 with bf16 AdamW moments (logging, evaluation, checkpoints
    with the CUDA RNG state), killed after its step-3 checkpoint and resumed: the same per-step losses
    as an uninterrupted run (up to the device's non-deterministic atomics), and the final weights,
    loaded on the CPU, give the logits of the model still on the device."""
    sets = (f"run.device='{DEVICE.type}'", "run.dtype='bf16'", "run.steps=6", "run.log_every=1",
            "run.eval_every=3", "run.save_every=3", "optim.moment_dtype='bf16'")
    quiet = {"progress": False, "echo": lambda _: None}
    Trainer(tiny_run_config(data_dir, *sets), tmp_path / "a", **quiet).train()
    interrupted = Trainer(tiny_run_config(data_dir, *sets), tmp_path / "b", **quiet)
    kill_at(interrupted, 5)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    resumed = Trainer.resume(tmp_path / "b", **quiet)
    assert resumed.step == 3
    result = resumed.train()
    straight, again = step_losses(tmp_path / "a"), step_losses(tmp_path / "b")
    assert [s for s, _ in again] == [s for s, _ in straight] == list(range(1, 7))
    for (_, a), (_, b) in zip(straight, again):
        assert math.isfinite(a) and abs(a - b) <= 1e-3 * a
    assert math.isfinite(result.val["val_loss"])

    loaded = load_model(result.final_dir)
    ids = torch.tensor([_prompts((16,))[0]]) % resumed.model.config.vocab_size
    resumed.model.eval()
    with torch.no_grad():
        _assert_fp32_close(resumed.model(ids.to(DEVICE)), loaded(ids))


# ---------------------------------------------------------------------------- serving engine
def test_engine_on_device_matches_cpu_generate_and_cpu_engine():
    """Greedy completions of the engine on the device (continuous batching, chunked prefill,
    preemption, MTP speculation) equal CPU `generate`; penalised greedy and seeded sampled requests
    equal the CPU engine's (the sampler's noise is a function of seed, step and token id only)."""
    ref = _v3()
    model = _on_device(ref)
    prompts = _prompts()
    greedy = RequestSampling(max_tokens=12, temperature=0)
    expected = [generate(ref, p, max_new_tokens=12, stop_tokens=[]).tokens[0] for p in prompts]
    engine = Engine(model, max_batch=3, block_size=4, cache_tokens=72, token_budget=16)
    handles = [engine.submit(p, greedy) for p in prompts[:3]]
    for _ in range(4):
        engine.step()
    handles += [engine.submit(p, greedy) for p in prompts[3:]]
    assert [h.result().choices[0].token_ids for h in handles] == expected
    assert engine.metrics.preemptions > 0 and engine.pool.free_blocks == engine.pool.num_blocks

    requests = [RequestSampling(max_tokens=12, temperature=0, repetition_penalty=1.3, frequency_penalty=0.5,
                                presence_penalty=0.2),
                RequestSampling(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, logprobs=2)]
    for sampling in requests:
        want = Engine(ref).generate_batch(prompts[:3], sampling)
        got = Engine(model).generate_batch(prompts[:3], sampling)
        assert [o.choices[0].token_ids for o in got] == [o.choices[0].token_ids for o in want]

    mtp_ref = _mtp_model(eps=0.5, depth=1)
    mtp_model = _on_device(mtp_ref)
    expected = [generate(mtp_ref, p, max_new_tokens=20, stop_tokens=[]).tokens[0] for p in prompts]
    engine = Engine(mtp_model, max_batch=3, block_size=4, cache_tokens=92, token_budget=16, speculative="mtp")
    handles = [engine.submit(p, RequestSampling(max_tokens=20, temperature=0)) for p in prompts]
    assert [h.result().choices[0].token_ids for h in handles] == expected
    assert 0 < engine.metrics.accepted < engine.metrics.drafted


# ---------------------------------------------------------------------------- checkpoints
def test_load_model_straight_to_the_device(tmp_path):
    """A checkpoint with an MTP module (its copies of the embedding and head are compared on load)
    loaded onto the device in float32 and bf16: the CPU load's weights, cast; float32 logits as the
    CPU's."""
    model = _mtp_model(eps=0.5, depth=1)
    model.save_pretrained(tmp_path / "m")
    on_cpu = load_model(tmp_path / "m")
    for dtype in (torch.float32, torch.bfloat16):
        loaded = load_model(tmp_path / "m", dtype=dtype, device=DEVICE)
        assert loaded.device.type == DEVICE.type and loaded.dtype == dtype
        ref_state = on_cpu.state_dict()
        for name, tensor in loaded.state_dict().items():
            assert tensor.device.type == DEVICE.type, name
            want = ref_state[name]
            want = want.to(tensor.dtype) if want.is_floating_point() else want
            assert torch.equal(tensor.cpu(), want), name
    ids = torch.tensor([_prompts((16,))[0]])
    with torch.no_grad():
        _assert_fp32_close(load_model(tmp_path / "m", device=DEVICE)(ids.to(DEVICE)), on_cpu(ids))


# ---------------------------------------------------------------------------- Engram offload
def test_engram_offload_to_the_device_matches_the_cpu_model():
    """Engram tables on the host, the rest on the device (pinned rows over a side stream): logits and
    the table's row-sparse gradient as the all-CPU model's, and greedy generation (plain and MTP) as
    on the CPU."""
    ref = _engram_model()
    prompts = [[5, 9, 3, 60, 61, 7, 8], [4, 12], [33, 34, 35, 36]]
    kwargs = dict(max_new_tokens=10, stop_tokens=[])
    expected_tokens = [generate(ref, prompts, **kwargs).tokens,
                       generate(ref, prompts, speculative="mtp", num_draft_tokens=2, **kwargs).tokens]
    model = copy.deepcopy(ref)
    offload_engram_tables(model, device=DEVICE, host="cpu")
    assert model.device.type == DEVICE.type
    assert all(layer.engram.table.weight.device.type == "cpu" for layer in model.engram_layers())
    got_tokens = [generate(model, prompts, **kwargs).tokens,
                  generate(model, prompts, speculative="mtp", num_draft_tokens=2, **kwargs).tokens]
    assert got_tokens == expected_tokens

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    for m in (ref, model):
        m.train()
        for layer in m.engram_layers():
            layer.engram.sparse_grad = True
    expected = ref(ids)
    expected.pow(2).mean().backward()
    got = model(ids.to(DEVICE))
    got.pow(2).mean().backward()
    _assert_fp32_close(got, expected)
    for ref_layer, layer in zip(ref.engram_layers(), model.engram_layers()):
        ref_grad, grad = ref_layer.engram.table.weight.grad, layer.engram.table.weight.grad
        assert grad.is_sparse and grad.device.type == "cpu"
        _assert_fp32_close(grad.to_dense(), ref_grad.to_dense())


def test_moe_layer_under_autocast_takes_the_grouped_gemm():
    """A whole MoE layer (router in float32, shared expert, routed experts) under bf16 autocast on the
    device against the same layer in float64 on the CPU with the float64 routing replayed."""
    config = ModelConfig.from_hf({"model_type": "deepseek_v3", **V3_BASE})
    torch.manual_seed(0)
    ref = MoE(config).double()
    ref.gate.reset_parameters()
    ref.experts.reset_parameters()
    ref.experts.implementation = "autograd_loop"
    x = torch.randn(2, 16, config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        expected, route = ref(x)
    layer = copy.deepcopy(ref).float().to(DEVICE)
    layer.experts.implementation = "auto"
    layer.replay_indices = route.indices.to(DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        got, got_route = layer(x.float().to(DEVICE))
    assert got.dtype == torch.float32
    assert torch.equal(got_route.counts.cpu(), route.counts)
    assert _rel_error(got, expected) < BF16_TOL
