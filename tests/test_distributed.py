"""Data, expert and data+expert parallel training on 2 and 4 gloo processes equal one process with the
same global batch (fp32: losses, gradients, gradient norms, weights after three AdamW steps, routing
biases); a checkpoint saved on 4 processes resumes on 2 on the same trajectory; layout errors;
all-to-all traffic under node-limited routing."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import tiny_run_config
from distributed_workers import bad_inputs, launch, record_first_gradients, resume_steps, train_steps

from seekformer.distributed.expert_parallel import all_to_all_bytes, expected_remote_copies, rows_sent
from seekformer.distributed.mesh import ParallelError, resolve_layout
from seekformer.training.pretrain import Trainer

STEPS = 3
SAVE_AT = 2  # the 4-process run saves a checkpoint here, which the resume test continues on 2


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory):
    """One process, global batch 4, fp32: per-step scalars, final weights and biases."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(_config(data_dir), tmp_path_factory.mktemp("single") / "run", progress=False)
        grads = record_first_gradients(trainer, lambda: {n: p.grad.clone() for n, p in
                                                         trainer.model.named_parameters() if p.grad is not None})
        history = [{k: float(v) for k, v in trainer.train_step()[0].items()} for _ in range(STEPS)]
    finally:
        torch.set_num_threads(threads)
    biases = {n: m.gate.e_score_correction_bias.clone() for n, m in trainer.moes.items()}
    return history, {k: v.clone() for k, v in trainer.model.state_dict().items()}, biases, grads


def _config(data_dir, *overrides):
    return tiny_run_config(data_dir, "run.dtype='fp32'", "run.device='cpu'", *overrides)


@pytest.fixture(scope="module")
def parallel_run(data_dir, tmp_path_factory):
    """`parallel_run(world, ep, checkpointing)`: (run directory, each rank's `train_steps` result), once per module."""
    runs = {}

    def run(world: int, ep: int, checkpointing: bool = False):
        key = world, ep, checkpointing
        if key not in runs:
            run_dir = tmp_path_factory.mktemp(f"world{world}-ep{ep}") / "run"
            cfg = _config(data_dir, f"parallel.ep={ep}", f"run.activation_checkpointing={str(checkpointing).lower()}")
            save_at = SAVE_AT if world == 4 else None
            runs[key] = run_dir, launch(train_steps, world, (cfg.to_dict(), str(run_dir), STEPS, save_at), timeout=150)
        return runs[key]
    return run


@pytest.mark.parametrize("world, ep, checkpointing", [(2, 1, False), (2, 2, False), (4, 2, False), (2, 2, True)],
                         ids=["dp2", "ep2", "dp2xep2", "ep2-activation-checkpointing"])
def test_parallel_training_equals_one_process(single_run, parallel_run, world, ep, checkpointing):
    """The oracle is one process without activation checkpointing: with it, on 2 ranks whose blocks are
    recomputed in the backward (all-to-alls included), losses, gradients, weights and biases are the
    same, and each step's loads count every token once."""
    _, results = parallel_run(world, ep, checkpointing)
    ref_history, ref_state, ref_biases, ref_grads = single_run
    for rank, (history, state, biases, grads) in enumerate(results):
        assert set(grads) == set(ref_grads)
        for name, grad in grads.items():  # the first step's (clipped) gradients
            scale = ref_grads[name].abs().max().clamp(min=1e-12)
            torch.testing.assert_close(grad / scale, ref_grads[name] / scale, rtol=0, atol=1e-5,
                                       msg=f"rank {rank} gradient of {name}")
        for ref, got in zip(ref_history, history):
            for key in ("loss", "mtp_loss_1", "balance_loss", "grad_norm"):
                assert got[key] == pytest.approx(ref[key], rel=1e-5), (rank, key)
        assert set(state) == {k for k in ref_state if k in state} and len(state) > 10
        for name, value in state.items():
            # AdamW's first steps move each weight by ~lr = 1e-3; reduction order changes a few weights by
            # ~1e-7 (~3e-6 where Adam divides a near-zero gradient by its near-zero second moment)
            torch.testing.assert_close(value, ref_state[name], rtol=0, atol=5e-6, msg=f"rank {rank} {name}")
        for name, bias in biases.items():  # the same global loads on every rank: the same bias updates
            torch.testing.assert_close(bias, ref_biases[name], rtol=0, atol=1e-7)
            assert bias.abs().max() > 0  # the biases did move
        for step in history:
            for name, loads in step["loads"].items():  # the global batch's: 4 x 32 tokens, top-2
                assert sum(loads) == 4 * (31 if name.startswith("mtp") else 32) * 2  # MTP: one position less


def test_checkpoint_of_four_processes_resumes_on_two(single_run, parallel_run, tmp_path):
    """Saved at step 2 on dp=2 x ep=2 (experts split in EP blocks, each FSDP-sharded over 2 ranks),
    resumed on 2 data-parallel processes (experts FSDP-sharded by rows: rank 0 holds experts 0-3, which
    ranks 0 and 2 held before): step 3 gives the uninterrupted run's losses, weights and biases."""
    source, four = parallel_run(4, 2)
    ref_history, ref_state, ref_biases, _ = single_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    results = launch(resume_steps, 2, (str(run), ["parallel.ep=1"], STEPS - SAVE_AT), timeout=150)
    for rank, (history, state, biases) in enumerate(results):
        for key in ("loss", "mtp_loss_1", "balance_loss", "grad_norm"):
            assert history[0][key] == pytest.approx(four[0][0][SAVE_AT][key], rel=1e-5), (rank, key)
            assert history[0][key] == pytest.approx(ref_history[SAVE_AT][key], rel=1e-5), (rank, key)
        assert set(state) == set(four[rank][1])  # every parameter
        for name, value in state.items():
            torch.testing.assert_close(value, ref_state[name], rtol=0, atol=5e-6, msg=f"rank {rank} {name}")
        for name, bias in biases.items():
            torch.testing.assert_close(bias, ref_biases[name], rtol=0, atol=1e-7)


@pytest.mark.parametrize("world, dp_shard, ep, experts, batch, words", [
    (4, 0, 3, 8, 4, "ep=3 does not divide the world size 4"),
    (2, 0, 4, 8, 4, "larger than the world size"),
    (4, 0, 4, 6, 4, "does not divide the model's 6 routed experts"),
    (4, 0, 1, 8, 6, "does not divide the global batch"),
    (4, 4, 2, 8, 4, "is 8, not the world size 4"),
])
def test_layout_errors_name_the_problem(world, dp_shard, ep, experts, batch, words):
    with pytest.raises(ParallelError, match=words):
        resolve_layout(world, 0, dp_shard, ep, experts, batch)


def test_layout_places_ep_ranks_next_to_each_other():
    layout = resolve_layout(8, 5, 0, 4, 16, 8)
    assert (layout.dp, layout.ep, layout.dp_rank, layout.ep_rank) == (2, 4, 1, 1)


def test_all_to_all_bytes_hand_counted():
    # 8 experts on 4 ranks (2 each); this is rank 1 (experts 2, 3)
    indices = torch.tensor([[2, 3],  # both local: nothing sent
                            [0, 1],  # both on rank 0: one copy
                            [0, 7],  # ranks 0 and 3: two copies
                            [4, 3]])  # rank 2 and local: one copy
    assert all_to_all_bytes(indices, 8, 4, 1, hidden=10, bytes_per_value=2, backward=False) == 4 * 10 * 2 * 2
    assert all_to_all_bytes(indices, 8, 4, 1, hidden=10) == 4 * 10 * 2 * 4
    assert rows_sent(indices, 8, 4, 1) == 5


def test_node_limited_routing_cuts_all_to_all_traffic():
    """V3-style router, 16 experts in 4 groups on 4 EP ranks, top-4: the bytes a rank sends fall with
    topk_group, and the measured copies per token stay under the formula topk_group * (ep - 1) / ep."""
    from seekformer.config import ModelConfig
    from seekformer.model.moe import Router

    n_tokens, ep = 4096, 4
    copies = {}
    for topk_group in (4, 2, 1):
        config = ModelConfig(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                             topk_group=topk_group, topk_method="noaux_tc", scoring_func="sigmoid",
                             moe_intermediate_size=16, norm_topk_prob=True)
        torch.manual_seed(0)
        router = Router(config)
        router.reset_parameters()
        x = torch.randn(n_tokens, 32)
        indices = router(x).indices
        per_rank = [all_to_all_bytes(indices, 16, ep, rank, hidden=32, bytes_per_value=1, backward=False)
                    for rank in range(ep)]
        copies[topk_group] = sum(per_rank) / (2 * 32 * ep * n_tokens)  # remote copies per token
        assert copies[topk_group] <= expected_remote_copies(ep, topk_group, 4) + 1e-9
    assert copies[1] == pytest.approx(0.75)  # one group: on another rank 3 times in 4
    assert copies[4] > copies[2] > copies[1]
    assert copies[2] == pytest.approx(expected_remote_copies(ep, 2, 4), rel=0.1)


def test_bad_inputs_fail_every_rank_with_a_message(data_dir, tmp_path):
    cfg = _config(data_dir, "parallel.timeout_s=20")
    errors = launch(bad_inputs, 2, (cfg.to_dict(), str(tmp_path)), timeout=150)
    for out in errors:  # every rank
        assert "ParallelError" in out["mismatch"] and "the run config differs between ranks" in out["mismatch"]
        assert "parallel.ep=4 is larger than the world size 2" in out["ep"]
        assert "CheckpointError" in out["other_experts"] and "holds another model" in out["other_experts"]
        assert "n_routed_experts is 8 there, 4 here" in out["other_experts"]
        # every weight of a 1-layer model is in the 2-layer checkpoint, shaped alike: the config tells
        assert "num_hidden_layers is 2 there, 1 here" in out["other_layers"]
    # rank 1 died while saving: rank 0 fails at once with gloo's message, and nothing was published
    assert "Connection closed by peer" in errors[0]["crash"] and errors[0]["crash_seconds"] < 30
    assert errors[0]["latest"] == "step_000000" and errors[0]["published"] == ["latest", "step_000000"]
