"""GRPO on one process recording its rollouts, and on spawned ranks replaying them (the data-parallel
post-training tests)."""

from __future__ import annotations

import torch


def _state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in
            model.state_dict().items()}


def record_rollouts(cfg_dict, run_dir, steps) -> dict:
    """One process, real generation: each step's rollout, the step records, the held-out evaluation
    and the weights after `steps` steps."""
    from seekformer.training.grpo import GRPOConfig, GRPOTrainer

    trainer = GRPOTrainer(GRPOConfig.from_dict(cfg_dict), run_dir, progress=False, echo=lambda _: None)
    before = _state(trainer.model)
    rollouts: list = []
    sample = trainer.rollout
    trainer.rollout = lambda examples, seed: rollouts.append(sample(examples, seed)) or rollouts[-1]
    records = [trainer.train_step() for _ in range(steps)]
    state = _state(trainer.model)
    moved = max(float((state[k] - before[k]).abs().max()) for k in state if state[k].is_floating_point())
    return {"rollouts": rollouts, "records": records, "eval": trainer.evaluate(), "state": state, "moved": moved}


def grpo_steps(rank, world, configs, rollouts, run_dir, steps) -> list[dict]:
    """For each config: DistributedGRPOTrainer whose ranks take their rows of the recorded global
    rollouts instead of sampling; step records, evaluation and final weights."""
    from seekformer.distributed.post_training import DistributedGRPOTrainer
    from seekformer.training.grpo import GRPOConfig

    out = []
    for i, (cfg_dict, recorded) in enumerate(zip(configs, rollouts)):
        trainer = DistributedGRPOTrainer(GRPOConfig.from_dict(cfg_dict), f"{run_dir}/{i}", progress=False)
        group = trainer.cfg.grpo.group_size

        def replay(examples, seed, trainer=trainer, recorded=recorded, group=group):
            global_rollout = recorded[trainer.step]
            rows = len(examples) * group
            mine = global_rollout.select(list(range(trainer.rank * rows, (trainer.rank + 1) * rows)))
            assert [e.prompt for e in mine.examples[::group]] == [e.prompt for e in examples]
            return mine

        trainer.rollout = replay
        records = [trainer.train_step() for _ in range(steps)]
        out.append({"records": records, "eval": trainer.evaluate(), "state": _state(trainer.model)})
    uneven = GRPOConfig.from_dict({**configs[0], "grpo": {**configs[0]["grpo"], "prompts_per_step": 3}})
    try:
        DistributedGRPOTrainer(uneven, f"{run_dir}/uneven", progress=False)
    except Exception as exc:  # noqa: BLE001 - the test reads which error it was
        out.append(f"{type(exc).__name__}: {exc}")
    return out
