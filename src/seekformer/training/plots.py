"""PNG plots of a run's metrics.jsonl: losses, MaxVio per MoE layer, expert-load heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .metrics import read_metrics

PLOTS = "plots"


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draw `loss.png`, `maxvio.png` and `expert_load.png` (those the metrics allow) into
    `out_dir` (default RUN/plots); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"no metrics in {run_dir} (expected {run_dir / 'metrics.jsonl'})")
    out = Path(out_dir) if out_dir is not None else run_dir / PLOTS
    out.mkdir(parents=True, exist_ok=True)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    written = []
    for name, draw in (("loss.png", _losses), ("maxvio.png", _maxvio), ("expert_load.png", _heatmap)):
        fig = draw(plt, train, val, run_dir.name)
        if fig is not None:
            fig.savefig(out / name, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(out / name)
    return written


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs = [r["tokens"] for r in records if key in r]
    return xs, [r[key] for r in records if key in r]


def _losses(plt, train, val, title):
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(*_series(train, "loss"), label="train (main head)", color="C0")
    for k in sorted({key for r in train for key in r if key.startswith("mtp_loss_")}):
        ax.plot(*_series(train, k), label=f"train MTP depth {k.rsplit('_', 1)[1]}", color="C1", alpha=0.7)
    if val:
        ax.plot(*_series(val, "val_loss"), "o-", label="validation (main head)", color="C3")
        for k in sorted({key for r in val for key in r if key.startswith("val_mtp_loss_")}):
            ax.plot(*_series(val, k), "s--", label=f"validation MTP depth {k.rsplit('_', 1)[1]}", color="C2")
    ax.set(xlabel="tokens", ylabel="cross-entropy (nats)", title=f"{title}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _maxvio(plt, train, val, title):
    layers = sorted({name for r in train for name in r.get("maxvio", {})}, key=_layer_order)
    if not layers:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    cmap = plt.get_cmap("viridis", max(len(layers), 2))
    for i, name in enumerate(layers):
        points = [(r["tokens"], r["maxvio"][name]) for r in train if name in r.get("maxvio", {})]
        ax.plot(*zip(*points), label=name, color=cmap(i))
    ax.set(xlabel="tokens", ylabel="MaxVio (max load / mean load - 1)", title=f"{title}: expert load imbalance")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    return fig


def _heatmap(plt, train, val, title):
    from matplotlib.colors import TwoSlopeNorm

    last = next((r for r in reversed(train) if r.get("expert_load")), None)
    if last is None:
        return None
    layers = sorted(last["expert_load"], key=_layer_order)
    n_experts = max(len(last["expert_load"][name]) for name in layers)
    grid = [last["expert_load"][name] + [float("nan")] * (n_experts - len(last["expert_load"][name]))
            for name in layers]
    fig, ax = plt.subplots(figsize=(min(2 + 0.25 * n_experts, 16), 1.2 + 0.4 * len(layers)))
    top = max(2.0, max(v for row in grid for v in row if v == v))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top)  # white = balanced, red = overloaded
    image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", norm=norm)
    ax.set_yticks(range(len(layers)), layers)
    ax.set(xlabel="expert", title=f"{title}: expert load / mean at step {last['step']} (1 = balanced)")
    fig.colorbar(image, ax=ax, label="load / mean load")
    return fig


def _layer_order(name: str) -> tuple[int, int]:
    kind, _, index = name.partition(".")
    return (0 if kind == "layers" else 1, int(index) if index.isdigit() else 0)
