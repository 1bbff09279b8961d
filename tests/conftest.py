from pathlib import Path

import pytest
import torch

from seekformer.data import prepare_data
from seekformer.training.metrics import read_metrics
from seekformer.training.run_config import RunConfig

TINY_TRAIN_RUN = [  # a 2-layer V3-style model: MLA, 1 shared + 8 routed experts top-2 in 2 groups, one MTP module
    "model.hidden_size=64", "model.num_hidden_layers=2", "model.intermediate_size=128",
    "model.moe_intermediate_size=32", "model.n_routed_experts=8", "model.num_experts_per_tok=2",
    "model.n_group=2", "model.topk_group=1", "model.num_attention_heads=2", "model.kv_lora_rank=32",
    "model.q_lora_rank=48", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
    "data.seq_len=32", "data.batch_size=4", "data.eval_batches=4", "schedule.warmup_steps=3",
    "balance.bias_update_speed=0.01", "balance.seq_aux_alpha=0.001",
]


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and with other processes on the machine two
    threads wait for each other on every operation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A small prepared dataset of the default corpus (384-token BPE), shared by the training tests."""
    out = tmp_path_factory.mktemp("data")
    prepare_data(None, out, vocab_size=384, max_bytes=200_000, val_fraction=0.05, progress=False)
    return out


def tiny_run_config(data_dir: Path, *overrides: str) -> RunConfig:
    """The TINY_TRAIN_RUN config on `data_dir`, then `overrides` (`section.key=value`)."""
    cfg = RunConfig()
    cfg.apply_overrides([f"data.dir='{data_dir}'", *TINY_TRAIN_RUN, *overrides])
    return cfg


def step_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every train record in a run's metrics.jsonl."""
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if r["kind"] == "train"]


def randomize_norms_and_bias(model: torch.nn.Module, seed: int = 1) -> None:
    """Move norm weights away from 1 and give the V3 router bias non-zero values, so that a
    mistake in either cannot hide behind the default initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=gen))
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.2 * torch.randn(bias.shape, generator=gen))


def kill_at(trainer, step: int) -> None:
    """Make `trainer` die (like a killed process) when it is about to run step `step`."""
    original = trainer.train_step

    def step_or_die():
        if trainer.step == step:
            raise KeyboardInterrupt
        return original()

    trainer.train_step = step_or_die
