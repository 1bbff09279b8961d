"""PNG plots of a GRPO run's metrics.jsonl: reward, accuracy (training and held-out), KL."""

from __future__ import annotations

from pathlib import Path

from .metrics import read_metrics
from .plots import PLOTS


def plot_grpo_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw `reward.png`, `accuracy.png` and `kl.png` (when the run logged a KL) into `out_dir`
    (default RUN/plots); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("kind") == "train" and "reward" in r]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        raise FileNotFoundError(f"no GRPO metrics in {run_dir} (expected {run_dir / 'metrics.jsonl'})")
    out = Path(out_dir) if out_dir is not None else run_dir / PLOTS
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in train]
    written = []

    def save(fig, name: str) -> None:
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(steps, [r["reward"] for r in train], label="total (weighted)", color="C0")
    names = sorted({k[len("reward_"):] for r in train for k in r if k.startswith("reward_") and not k.endswith("_std")
                    and k != "reward_std"})
    for i, name in enumerate(names, start=1):
        ax.plot(steps, [r.get(f"reward_{name}") for r in train], label=name, color=f"C{i}", alpha=0.7)
    ax.set(xlabel="step", ylabel="mean reward", title=f"{run_dir.name}: reward")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "reward.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(steps, [r["accuracy"] for r in train], label="training rollouts (sampled)", color="C0", alpha=0.6)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", color="C3",
                label="held-out (greedy)")
    ax.set(xlabel="step", ylabel="accuracy", title=f"{run_dir.name}: accuracy", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "accuracy.png")

    if any("kl" in r for r in train):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot([r["step"] for r in train if "kl" in r], [r["kl"] for r in train if "kl" in r], color="C2")
        ax.set(xlabel="step", ylabel="KL(policy || reference), k3", title=f"{run_dir.name}: KL")
        ax.grid(alpha=0.3)
        save(fig, "kl.png")
    return written
