"""The hooks where data-parallel post-training differs from one process are written once for SFT and
GRPO, and the distributed trainers override every one of them."""

from __future__ import annotations

from seekformer.distributed.post_training import DataParallel, DistributedGRPOTrainer, DistributedSFTTrainer
from seekformer.training.grpo import GRPOTrainer
from seekformer.training.post_training_hooks import OneProcessHooks
from seekformer.training.sft import SFTTrainer

HOOKS = ("parallelize", "reduce_sums", "clip_gradients", "out_of_time")


def test_one_process_hooks_are_shared():
    for name in HOOKS:
        assert getattr(SFTTrainer, name) is getattr(GRPOTrainer, name) is getattr(OneProcessHooks, name), name


def test_distributed_trainers_override_every_hook():
    """A hook left to the one-process side would reduce nothing over ranks: each rank would clip,
    normalise and stop on its own."""
    for trainer in (DistributedSFTTrainer, DistributedGRPOTrainer):
        for name in HOOKS:
            assert getattr(trainer, name) is getattr(DataParallel, name), (trainer.__name__, name)
