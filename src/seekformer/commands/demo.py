"""`seekformer demo`: train a tiny DeepSeek-V3-style model from scratch for a few minutes, then sample.

No download: the corpus is the Python standard library (prepared once, then cached). The model has
everything V3 trains with: MLA, shared + fine-grained routed experts, sigmoid group-limited routing,
auxiliary-loss-free balancing with a tiny sequence-wise loss, and one MTP module.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import demo_r1

HELP = "train a tiny DeepSeek-V3-style model for a few minutes on the Python stdlib, then generate a sample"
DEFAULT_PROMPT = "def main():\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=5.0, help="training time budget in minutes (default 5)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="run directory (default runs/demo-DATE-TIME)")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="a prepared dataset, or where to prepare the default corpus "
                        "(default: the cache, ~/.cache/seekformer/data/python-stdlib)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"prompt of the sample (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--max-new-tokens", type=int, default=80, help="length of the sample (default 80)")
    parser.add_argument("--seed", type=int, default=0, help="seed of init, data order and sampling (default 0)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="override a setting of the demo's run config (see seekformer train)")
    parser.add_argument("--no-progress", action="store_true", help="print log lines instead of progress bars")
    demo_r1.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.r1:
        return demo_r1.run(args)
    from seekformer.data import load_meta, prepare_data
    from seekformer.runtime import resolve_device
    from seekformer.training.plots import plot_run
    from seekformer.training.pretrain import Trainer, check_new_run_dir, ensure_default_data
    from seekformer.training.run_config import RunConfig

    from .train import summary

    # every argument is checked before the corpus is prepared and the budget spent
    if args.minutes <= 0:
        raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    cfg = RunConfig.preset("demo")
    cfg.set("run.seed", args.seed)
    cfg.set("run.max_minutes", args.minutes)
    # the trainer fits the schedule's length to the budget at the end of warmup: 6 warmup steps per
    # minute of budget (5 to 30) leave most of a short budget to the schedule proper
    cfg.set("schedule.warmup_steps", max(5, min(30, int(6 * args.minutes))))
    cfg.apply_overrides(args.overrides)
    resolve_device(cfg.run.device)
    out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    check_new_run_dir(out)
    data_arg = args.data or (Path(cfg.data.dir) if cfg.data.dir else None)
    if data_arg is not None and not (data_arg / "meta.json").is_file():
        check_new_data_dir(data_arg)

    progress = False if args.no_progress else None
    started = time.perf_counter()
    show = not args.no_progress
    if data_arg is None:
        data_dir = ensure_default_data(show)
    elif (data_arg / "meta.json").is_file():
        data_dir = data_arg
    else:
        print(f"data     preparing the default corpus (the Python standard library) in {data_arg}")
        prepare_data(None, data_arg, progress=show)
        data_dir = data_arg
    meta = load_meta(data_dir)
    print(f"data     {data_dir}: {meta['splits']['train']['tokens']:,} training tokens, vocabulary "
          f"{meta['vocab_size']} ({time.perf_counter() - started:.0f} s)")

    cfg.set("data.dir", str(data_dir))
    trainer = Trainer(cfg, out, progress=progress)
    c = trainer.model_config
    print(f"model    {trainer.n_params.total / 1e6:.1f}M parameters ({trainer.n_params.active / 1e6:.1f}M active): "
          f"{c.num_hidden_layers} layers, MLA, {c.n_shared_experts} shared + {c.n_routed_experts} routed experts "
          f"top-{c.num_experts_per_tok} ({c.n_group} groups, keep {c.topk_group}), MTP depth {len(trainer.model.mtp)}")
    print(f"budget   {args.minutes:g} min of training, steps of {cfg.tokens_per_step:,} tokens")

    result = trainer.train()
    plots = plot_run(result.run_dir)
    text = sample(result.final_dir, args.prompt, args.max_new_tokens, args.seed)
    print("\nsample (temperature 0.8, top-k 40):\n" + "-" * 60 + f"\n{text}\n" + "-" * 60)
    print(summary(result))
    print(f"  plots       {', '.join(str(p) for p in plots)}")
    print(f"total time {time.perf_counter() - started:.0f} s. Next: seekformer plot {result.run_dir}; "
          f"load {result.final_dir} with seekformer.load_model or transformers.AutoModelForCausalLM")
    return 0


def check_new_data_dir(path: Path) -> None:
    """--data names no prepared dataset: it must be a directory the default corpus can be prepared in,
    an empty or new one whose parent exists (a typo must not create directories)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--data {path} is not a directory")
    if path.is_dir() and any(path.iterdir()):
        raise ValueError(f"--data {path} holds files but no prepared dataset (no meta.json): give a dataset "
                         "made by seekformer data prepare, or an empty or new directory to prepare the default "
                         "corpus in")
    if not path.exists() and not path.parent.is_dir():
        raise ValueError(f"--data {path}: no prepared dataset there, and its parent directory {path.parent} does "
                         "not exist (create it to prepare the default corpus there)")


def sample(model_dir: Path, prompt: str, max_new_tokens: int, seed: int) -> str:
    """Load the saved model directory (as any user would) and continue `prompt`."""
    import torch

    from seekformer import load_model
    from seekformer.inference import generate
    from seekformer.tokenizer import load_tokenizer

    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    with torch.inference_mode():  # no stop token: a document's end shows as <|end_of_text|> and the text goes on
        out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0.8, top_k=40, seed=seed,
                       stop_tokens=[])
    return prompt + tokenizer.decode(out.tokens[0])
