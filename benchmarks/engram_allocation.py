"""Sparsity allocation between routed experts and Engram tables (Engram paper §3.1) at small scale.

    python benchmarks/engram_allocation.py [--steps 150] [--rhos 100,87.5,75,62.5,50,25] [--seeds 0]
        [--threads 1] [--out runs/engram_allocation] [--no-reference]

Every run has the same total and the same activated parameters. The sparse budget is
total - activated: the routed-expert parameters a token does not use (and, with Engram, the table
rows it does not read). rho is the share of that budget kept as routed experts; the rest becomes
Engram table rows. rho = 100 % is the pure-MoE model (the iso-parameter baseline). The base model is
tiny-v3 with top-4 of `--experts` routed experts per MoE layer (1 shared expert, sigmoid routing
with the auxiliary-loss-free bias, MLA, n_group = topk_group = 1 so any expert count is allowed,
no MTP module). Lowering rho removes inactive routed experts from every MoE layer and gives their
parameters to the Engram tables (one Engram module in layer 1: orders 2-3, 4 heads per order, rows
of 16 numbers; `engram_table_size` is chosen so the table holds the freed parameters). Engram's
dense parts (key/value projections, norms, conv) are activated parameters: the dense FFN of
layer 0 is narrowed by the same number of parameters, so the activated count stays equal too.
The reference run ("ref") keeps only the activated experts (top-k of k: no sparse budget at all).

Equal tokens for every run (same steps, batch, sequence length), same seed and data order, bf16,
the Trainer's normal path (Engram tables: SparseAdam at 5x lr). The final validation loss is over
the whole validation split. Each finished run stores `result.json` in its directory under --out and
is skipped when the script runs again; `results.json`, `table.md` and the plot always cover every
finished run in --out (so a second seed can be added later with --rhos ... --seeds 1).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from seekformer.config import ModelConfig
from seekformer.model.stats import count_parameters
from seekformer.model.transformer import Transformer
from seekformer.training.pretrain import Trainer, default_data_dir, ensure_default_data
from seekformer.training.run_config import RunConfig

TOP_K = 4
ENGRAM = {"engram_layer_ids": [1], "engram_max_ngram": 3, "engram_heads": 4, "engram_dim_per_ngram": 64}


def run_name(rho: float | None, seed: int) -> str:
    return f"ref_seed{seed}" if rho is None else f"rho{rho:g}_seed{seed}"


def base_config(args: argparse.Namespace) -> RunConfig:
    cfg = RunConfig.preset("demo")
    cfg.apply_overrides([
        f"run.steps={args.steps}", "run.eval_every=0", "run.save_every=0", f"run.log_every={max(1, args.steps // 20)}",
        "run.fit_to_time=false", "run.max_minutes=0", f"run.threads={args.threads}", "run.dtype=bf16",
        "data.eval_batches=0", f"data.seq_len={args.seq_len}", f"data.batch_size={args.batch_size}", "mtp.depth=0",
        "model.n_group=1", "model.topk_group=1", f"model.num_experts_per_tok={TOP_K}",
        f"model.n_routed_experts={args.experts}", *args.set,
    ])
    return cfg


def build(cfg: RunConfig, fields: dict, vocab: int, special: dict) -> tuple[ModelConfig, dict]:
    """The model config with `fields` on top of `cfg`, and its parameter counts (built on CPU, not trained)."""
    model_fields = {**cfg.model, **fields}
    trial = RunConfig(model=model_fields, data=cfg.data, optim=cfg.optim, schedule=cfg.schedule,
                      balance=cfg.balance, mtp=cfg.mtp, engram=cfg.engram, run=cfg.run)
    config = trial.model_config(vocab, special)
    model = Transformer(config)
    counts = count_parameters(model)
    table = sum(layer.engram.table.weight.numel() for layer in model.engram_layers())
    rows = sum(layer.engram.table.weight.shape[0] for layer in model.engram_layers())
    routed = counts.routed_experts
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    per_expert = routed // (moe_layers * config.n_routed_experts)
    activated = counts.active - counts.engram_lookup  # table reads (like embedding lookups) are not counted
    info = {
        "total": counts.total, "activated": activated, "embedding": counts.embedding,
        "engram_table": table, "engram_rows": rows, "engram_dense": counts.engram - table,
        "routed_experts": routed, "inactive_experts": routed - moe_layers * TOP_K * per_expert,
        "per_expert": per_expert, "moe_layers": moe_layers, "n_routed_experts": config.n_routed_experts,
        "intermediate_size": config.intermediate_size,
    }
    info["sparse"] = info["total"] - info["activated"]
    return config, info


def plan(rho: float | None, cfg: RunConfig, vocab: int, special: dict, base: dict) -> tuple[dict, dict]:
    """Model fields and parameter counts of the run at allocation ratio `rho` (None = the reference)."""
    experts = cfg.model["n_routed_experts"]
    inactive_per_layer = experts - TOP_K
    if rho is None:
        fields = {"n_routed_experts": TOP_K}
        return fields, build(cfg, fields, vocab, special)[1]
    keep = rho / 100 * inactive_per_layer
    if abs(keep - round(keep)) > 1e-9:
        raise ValueError(f"rho {rho}% of {inactive_per_layer} inactive experts per layer is not a whole number "
                         f"of experts; choose rho as a multiple of {100 / inactive_per_layer:g}% or change --experts")
    n_experts = TOP_K + round(keep)
    fields = {"n_routed_experts": n_experts}
    if n_experts == experts:
        return fields, base
    target = base["sparse"] - base["moe_layers"] * round(keep) * base["per_expert"]  # parameters for the tables
    width = ENGRAM["engram_dim_per_ngram"] // ENGRAM["engram_heads"]
    heads = (ENGRAM["engram_max_ngram"] - 1) * ENGRAM["engram_heads"] * len(ENGRAM["engram_layer_ids"])
    size = max(2, round(target / width / heads))
    info = None
    for _ in range(6):  # primes >= size: walk the minimum size down until the table holds ~target parameters
        fields = {**fields, **ENGRAM, "engram_table_size": [size] * (ENGRAM["engram_max_ngram"] - 1)}
        _, info = build(cfg, fields, vocab, special)
        step = round((info["engram_table"] - target) / width / heads)
        if step == 0:
            break
        size -= step
    # the Engram module's dense parts are activated: narrow the dense FFN (layer 0) by as many parameters
    d = info["activated"] - base["activated"]
    model = cfg.model_config(vocab, special)
    shrink = round(d / (3 * model.hidden_size * model.first_k_dense_replace))  # gate, up, down per unit
    fields["intermediate_size"] = base["intermediate_size"] - shrink
    _, info = build(cfg, fields, vocab, special)
    return fields, info


def run_one(rho: float | None, seed: int, args: argparse.Namespace, fields: dict, info: dict) -> dict:
    run_dir = args.out / run_name(rho, seed)
    done = run_dir / "result.json"
    if done.is_file():
        result = json.loads(done.read_text())
        print(f"{run_dir.name}: cached (val loss {result['val_loss']:.4f})")
        return result
    if run_dir.exists():  # an unfinished run: start it again (no intermediate checkpoints are kept)
        shutil.rmtree(run_dir)
    cfg = base_config(args)
    cfg.model.update(fields)
    cfg.run.seed = seed
    start = time.perf_counter()
    trainer = Trainer(cfg, run_dir, progress=not args.no_progress)
    counts = count_parameters(trainer.model)
    assert counts.total == info["total"], (counts.total, info["total"])
    outcome = trainer.train()
    minutes = (time.perf_counter() - start) / 60
    result = {
        "name": run_dir.name, "rho": rho, "seed": seed, "steps": outcome.step, "tokens": outcome.tokens,
        "val_loss": outcome.val["val_loss"], "val_ppl": outcome.val["val_ppl"],
        "val_maxvio": outcome.val.get("val_maxvio_mean"), "val_engram_gate": outcome.val.get("val_engram_gate"),
        "train_loss": outcome.train.get("loss"), "minutes": round(minutes, 2), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "fields": fields, **info,
    }
    done.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{run_dir.name}: val loss {result['val_loss']:.4f} (ppl {result['val_ppl']:.1f}), {minutes:.1f} min")
    return result


def collect(out: Path) -> list[dict]:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))]
    return sorted(results, key=lambda r: (r["rho"] is None, -(r["rho"] or 0), r["seed"]))


def table(results: list[dict]) -> str:
    seeds = sorted({r["seed"] for r in results})
    by_key: dict = {}
    for r in results:
        by_key.setdefault(r["rho"], {})[r["seed"]] = r
    head = ["ρ (MoE share)", "routed experts / layer", "Engram table rows", "table params", "routed-expert params",
            "total params", "activated params", *[f"val loss seed {s}" for s in seeds], "val loss mean",
            "val ppl (mean loss)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rho, runs in by_key.items():
        r = next(iter(runs.values()))
        losses = [runs[s]["val_loss"] for s in seeds if s in runs]
        mean = sum(losses) / len(losses)
        label = "ref (top-k of k, no sparse budget)" if rho is None else f"{rho:g} %"
        cells = [label, f"{r['n_routed_experts']} (top-{TOP_K})", f"{r['engram_rows']:,}", f"{r['engram_table']:,}",
                 f"{r['routed_experts']:,}", f"{r['total']:,}", f"{r['activated']:,}",
                 *[f"{runs[s]['val_loss']:.4f}" if s in runs else "" for s in seeds], f"{mean:.4f}",
                 f"{math.exp(mean):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    seeds = sorted({r["seed"] for r in results})
    for i, seed in enumerate(seeds):
        pts = sorted((r["rho"], r["val_loss"]) for r in results if r["seed"] == seed and r["rho"] is not None)
        if pts:
            ax.plot(*zip(*pts), "o-" if i == 0 else "s--", color=f"C{i}", alpha=1 if i == 0 else 0.7,
                    label=f"seed {seed}")
        ref = [r["val_loss"] for r in results if r["seed"] == seed and r["rho"] is None]
        if ref:
            ax.axhline(ref[0], color=f"C{i}", ls=":", lw=1, label=f"ref: only the top-{TOP_K} experts (seed {seed})")
    rhos = sorted({r["rho"] for r in results if r["rho"] is not None})
    if len(seeds) > 1:
        means = []
        for rho in rhos:
            losses = [r["val_loss"] for r in results if r["rho"] == rho]
            if len(losses) == len(seeds):
                means.append((rho, sum(losses) / len(losses)))
        if means:
            ax.plot(*zip(*means), "k^-", lw=1.5, label="mean of the seeds")
        refs = [r["val_loss"] for r in results if r["rho"] is None]
        if len(refs) > 1:
            ax.axhline(sum(refs) / len(refs), color="k", ls=":", lw=1.5, label=f"ref: mean of {len(refs)} seeds")
    ax.set(xlabel="ρ: share of the sparse budget kept as routed experts (%)", ylabel="final validation loss",
           title="Sparsity allocation: routed experts vs Engram tables\n(equal total and activated parameters)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rhos", default="100,87.5,75,62.5,50,25", help="allocation ratios in percent")
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--experts", type=int, default=20, help="routed experts per MoE layer at rho = 100%%")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-reference", action="store_true", help="skip the run with only the top-k experts")
    parser.add_argument("--set", action="append", default=[], help="extra section.key=value for every run")
    parser.add_argument("--out", type=Path, default=Path("runs/engram_allocation"))
    parser.add_argument("--plot", type=Path, default=Path("docs/img/engram_allocation.png"))
    parser.add_argument("--plan-only", action="store_true", help="print the parameter budgets and stop")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rhos: list[float | None] = [float(r) for r in args.rhos.split(",") if r]
    if not args.no_reference:
        rhos.append(None)
    seeds = [int(s) for s in args.seeds.split(",")]

    cfg = base_config(args)
    data_dir = Path(cfg.data.dir) if cfg.data.dir else default_data_dir()
    if not cfg.data.dir:
        ensure_default_data(progress=False)
    meta = json.loads((data_dir / "meta.json").read_text())
    vocab = meta["vocab_size"]
    special = {k: v for k, v in {"bos_token_id": meta.get("bos_id"), "eos_token_id": meta["eos_id"],
                                 "pad_token_id": meta.get("pad_id")}.items() if v is not None}
    _, base = build(cfg, {}, vocab, special)
    plans = {rho: plan(rho, cfg, vocab, special, base) for rho in rhos}
    print(f"sparse budget (pure MoE, {args.experts} routed experts, top-{TOP_K}): {base['sparse']:,} parameters")
    print("| run | routed experts | dense FFN | table rows | table | Engram dense | routed experts | inactive experts "
          "| total | activated | sparse |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rho, (_, i) in plans.items():
        print(f"| {run_name(rho, 0)[:-6]} | {i['n_routed_experts']} | {i['intermediate_size']} | {i['engram_rows']:,} "
              f"| {i['engram_table']:,} | {i['engram_dense']:,} | {i['routed_experts']:,} | {i['inactive_experts']:,} "
              f"| {i['total']:,} | {i['activated']:,} | {i['sparse']:,} |")
    if args.plan_only:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        for rho in rhos:
            run_one(rho, seed, args, *plans[rho])
    results = collect(args.out)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    (args.out / "table.md").write_text(text + "\n")
    steps = sorted({r["steps"] for r in results})
    tokens = sorted({r["tokens"] for r in results})
    print(f"\n# steps {steps}, tokens {tokens}, {args.batch_size} x {args.seq_len} tokens per step")
    print(text)
    draw(results, args.plot)


if __name__ == "__main__":
    main()
