"""MTP speculative decoding: acceptance rate and end-to-end speed-up over plain decoding.

    python benchmarks/mtp.py --model DIR             # a model trained with MTP (tokenizer.json inside)
    python benchmarks/mtp.py [--out DIR]             # no model yet: fit one first (see below)

Prompts are windows of Python standard-library source (the default corpus), encoded with the
model's tokenizer. Each prompt is decoded at batch 1, greedy and sampled (--temperatures), without
and with `speculative="mtp"` for each `--drafts` value, interleaved, best of --repeats runs each.
The table gives the acceptance rate of the first drafted token, drafted tokens kept per step,
decode tokens/s, and the speed-up over plain decoding measured in the same run.

Without --model the script makes a stand-in (until a checkpoint of the training issue exists):
a small V3-style model trained on the prepared corpus (next-token loss), then its MTP module fitted
by distillation with the main model frozen: at each position i the module (inputs h_i and the
embedding of t_{i+1}) is trained to match the main model's own distribution for t_{i+2}, i.e. what
the verifier will say one step later. The MTP block starts as a copy of the last decoder layer.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import machine

from seekformer import ModelConfig, Transformer, load_model
from seekformer.data import PackedDataset
from seekformer.inference import generate
from seekformer.tokenizer import load_tokenizer
from seekformer.training.pretrain import ensure_default_data

STAND_IN = dict(
    model_type="deepseek_v3", hidden_size=256, intermediate_size=704, num_hidden_layers=12, num_attention_heads=4,
    num_key_value_heads=4, kv_lora_rank=64, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=32,
    v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=128,
    n_group=1, topk_group=1, first_k_dense_replace=1, max_position_embeddings=1024, num_nextn_predict_layers=1,
    tie_word_embeddings=False,
)


def batches(dataset: PackedDataset, batch: int, seq: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(dataset) - seq - 1, size=batch)
        yield dataset.windows(starts, seq)


def lr_at(step: int, steps: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1))))


def train_main(model: Transformer, dataset: PackedDataset, steps: int, batch: int, seq: int, lr: float) -> float:
    params = [p for n, p in model.named_parameters() if not n.startswith("mtp.")]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    loss_value = float("nan")
    start = time.perf_counter()
    for step, (x, y) in zip(range(steps), batches(dataset, batch, seq, seed=1)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss_value = loss.item() if step == 0 else 0.98 * loss_value + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            print(f"  main step {step:4d}  loss {loss_value:.3f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    return loss_value


def distill_mtp(model: Transformer, dataset: PackedDataset, steps: int, batch: int, seq: int, lr: float) -> float:
    """Fit MTP module 1 to the frozen main model's next-next-token distribution (soft cross-entropy)."""
    model.mtp[0].load_state_dict(model.model.layers[-1].state_dict(), strict=False)
    params = list(model.mtp.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.eval()
    loss_value = agree = float("nan")
    start = time.perf_counter()
    for step, (x, _) in zip(range(steps), batches(dataset, batch, seq, seed=2)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=20)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                h0 = model.hidden_states(x)
                target = model.lm_head(h0[:, 1:]).float()  # main model's prediction of t_{i+2}, at i+1
            h1 = model.mtp_hidden_states(h0, x)[0]  # [B, T-1]
            logits = model.mtp_logits(h1, 1).float()
        loss = -(target.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        hit = (logits.argmax(-1) == target.argmax(-1)).float().mean().item()
        loss_value = loss.item() if step == 0 else 0.95 * loss_value + 0.05 * loss.item()
        agree = hit if step == 0 else 0.95 * agree + 0.05 * hit
        if step % 50 == 0 or step == steps - 1:
            print(f"  mtp step {step:4d}  soft CE {loss_value:.3f}  argmax agreement {agree:.2f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return agree


def fit_stand_in(out: Path, args: argparse.Namespace) -> None:
    print(f"# fitting a stand-in MTP model into {out}", flush=True)
    corpus = ensure_default_data(progress=False)
    dataset = PackedDataset(corpus, "train")
    meta = dataset.meta
    torch.manual_seed(0)
    config = ModelConfig.from_hf({**STAND_IN, "vocab_size": int(meta["vocab_size"]),
                                  "eos_token_id": int(meta["eos_id"]), "bos_token_id": int(meta["bos_id"])})
    model = Transformer(config)
    loss = train_main(model, dataset, args.train_steps, args.batch, args.seq, lr=3e-3)
    agree = distill_mtp(model, dataset, args.mtp_steps, args.batch, args.seq, lr=2e-3)
    model.eval().save_pretrained(out)
    load_tokenizer(corpus).save(out)
    (out / "fit.json").write_text(json.dumps({
        "train_steps": args.train_steps, "mtp_steps": args.mtp_steps, "batch": args.batch, "seq": args.seq,
        "final_train_loss": loss, "mtp_argmax_agreement": agree}, indent=2) + "\n")


def prompts_from_corpus(tokenizer, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` tokens (the model's tokenizer) from the corpus' validation split."""
    corpus = ensure_default_data(progress=False)
    dataset = PackedDataset(corpus, "val")
    corpus_tokenizer = load_tokenizer(corpus)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(dataset) - 4 * length, size=count)
    texts = [corpus_tokenizer.decode(np.asarray(dataset.tokens[s:s + 4 * length], dtype=np.int64)) for s in starts]
    return [tokenizer.encode(text)[:length] for text in texts]


def measure(model, prompts, new: int, temperature: float, drafts: list[int], repeats: int) -> dict[int, dict]:
    """Decode tokens/s (0 = plain decoding) and acceptance per draft count. Modes are interleaved per
    prompt and each run's time is the best of `repeats` (a shared machine's noise only slows runs)."""
    totals = {d: {"tokens": 0, "seconds": 0.0, "drafted": 0, "accepted": 0, "kept": 0} for d in [0, *drafts]}
    for i, prompt in enumerate(prompts):
        for d, total in totals.items():
            runs = [generate(model, prompt, max_new_tokens=new, temperature=temperature, seed=i, stop_tokens=[],
                             speculative="mtp" if d else None, num_draft_tokens=d or None) for _ in range(repeats)]
            s = runs[0].stats
            total["tokens"] += s.decode_tokens
            total["seconds"] += min(r.stats.decode_seconds for r in runs)
            if d:
                total["drafted"] += s.drafted
                total["accepted"] += s.accepted_per_depth[0]
                total["kept"] += sum(s.accepted_per_depth)
    return {d: {"tokens_per_s": t["tokens"] / t["seconds"],
                "acceptance": t["accepted"] / t["drafted"] if t["drafted"] else None,
                "kept_per_step": t["kept"] / t["drafted"] if t["drafted"] else None} for d, t in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory with MTP weights and tokenizer.json")
    parser.add_argument("--out", default="/tmp/seekformer-mtp-stand-in", help="where the stand-in is kept")
    parser.add_argument("--train-steps", type=int, default=500)
    parser.add_argument("--mtp-steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--drafts", default="1,2")
    parser.add_argument("--repeats", type=int, default=3, help="runs per prompt and mode; the fastest counts")
    parser.add_argument("--temperatures", default="0,0.7")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--fit-threads", type=int, default=None,
                        help="torch threads while fitting the stand-in (1 is steadier on a shared machine)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's; 1 is steadier when other processes share the CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    directory = Path(args.model or args.out)
    if args.model is None and not (directory / "config.json").is_file():
        threads = torch.get_num_threads()
        if args.fit_threads:
            torch.set_num_threads(args.fit_threads)
        fit_stand_in(directory, args)
        torch.set_num_threads(threads)
    model = load_model(directory, dtype=getattr(torch, args.dtype))
    if not len(model.mtp):
        raise SystemExit(f"{directory} has no MTP module (num_nextn_predict_layers=0)")
    tokenizer = load_tokenizer(directory)
    prompts = prompts_from_corpus(tokenizer, args.prompts, args.prompt_length, seed=3)
    c = model.config
    print(f"# MTP speculative decoding, {directory}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
          f"{c.num_nextn_predict_layers} MTP module(s), vocab {c.vocab_size}; {args.dtype}; batch 1, "
          f"{len(prompts)} prompts x {args.prompt_length} tokens, {args.new_tokens} new tokens; {machine()}")
    print("| temperature | drafts | acceptance (1st draft) | drafts kept / step | decode tok/s | plain tok/s "
          "| speed-up |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        generate(model, prompts[0], max_new_tokens=8, speculative="mtp")  # warm-up
        drafts = [int(d) for d in args.drafts.split(",")]
        for temperature in (float(t) for t in args.temperatures.split(",")):
            result = measure(model, prompts, args.new_tokens, temperature, drafts, args.repeats)
            plain = result[0]["tokens_per_s"]
            for d in drafts:
                r = result[d]
                print(f"| {temperature:g} | {d} | {100 * r['acceptance']:.1f}% | {r['kept_per_step']:.2f} | "
                      f"{r['tokens_per_s']:.1f} | {plain:.1f} | {r['tokens_per_s'] / plain:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
