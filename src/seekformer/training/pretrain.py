"""The pretraining loop: next-token loss + Multi-Token Prediction + DeepSeek-V3 load balancing.

One optimizer step: `grad_accum` micro-batches of `batch_size` sequences, each contributing
  CE(main) + lambda/D * sum_k CE(MTP depth k) + balance losses (sequence-wise, expert-level)
scaled by 1/grad_accum; global-norm clipping; AdamW (and SparseAdam for Engram tables); then the
auxiliary-loss-free bias update from the expert loads of the whole step. Compute runs under bf16
autocast (weights, optimizer states and routers stay float32). Everything that steers the trajectory
(weights, router biases, optimizers, RNG, data position, step) is in the checkpoint, so a resumed run
continues the same trajectory.

The pieces are separate so that other loops (fine-tuning, RL, data-parallel runs) can reuse them:
`Trainer.__init__` builds data, model and optimizers; `train_step` is one optimisation step returning
device tensors; `train` is the loop that logs (the only place values cross to the host), evaluates
and saves; `save` / `resume` hold everything a run needs to continue.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError, checkpoint_config, load_state_into
from ..data import BatchSampler, PackedDataset, eval_batches, prepare_data
from ..model.moe import RouterOutput
from ..model.stats import count_parameters, flops_per_token
from ..model.transformer import Transformer
from ..runtime import resolve_device, set_cpu_threads
from ..tokenizer import load_tokenizer
from .activation_checkpointing import apply_activation_checkpointing
from .balance import add_loads, expert_balance_loss, max_violation, moe_layers, sequence_balance_loss, update_bias
from .checkpointing import (
    CHECKPOINTS,
    latest_checkpoint,
    load_checkpoint,
    publish_dir,
    save_checkpoint,
    write_model_dir,
)
from .cross_entropy import linear_cross_entropy
from .machine import measure_matmul_peak
from .memory import allocation_error, check_fits
from .metrics import Interval, MetricsLog, to_host
from .optim import (
    bias_update_speed,
    build_engram_optimizer,
    build_optimizer,
    clip_grad_norm,
    lr_factor,
    mtp_weight,
    set_lr,
)
from .run_config import RunConfig

RUN_CONFIG = "run_config.json"
FINAL = "final"


def default_data_dir() -> Path:
    """Where the default corpus is prepared once and reused: $SEEKFORMER_CACHE, else
    $XDG_CACHE_HOME/seekformer, else ~/.cache/seekformer; then data/python-stdlib."""
    root = os.environ.get("SEEKFORMER_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seekformer"
    return Path(root) / "data" / "python-stdlib"


def ensure_default_data(progress: bool) -> Path:
    """Prepare the default corpus (the Python standard library, 8192-token BPE) unless cached."""
    directory = default_data_dir()
    prepare_data(None, directory, progress=progress)
    return directory


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    final_dir: Path
    checkpoint: Path
    train: dict[str, Any] = field(default_factory=dict)  # the last "train" metrics record
    val: dict[str, Any] = field(default_factory=dict)  # the last "val" metrics record
    stopped_by_time: bool = False


class Trainer:
    """Builds model, data, optimizer from a RunConfig in `run_dir`, or resumes the run there.

    `Trainer(cfg, run_dir)` starts a new run (the directory must not hold one);
    `Trainer.resume(run_dir)` continues from its latest checkpoint.
    """

    # a data-parallel subclass (seekformer.distributed.trainer) sets these before __init__
    rank, world_size, is_main = 0, 1, True

    def __init__(self, cfg: RunConfig, run_dir: str | Path, progress: bool | None = None,
                 echo: Callable[[str], None] | None = None, _resuming: bool = False):
        self.run_dir = Path(run_dir)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.echo = echo or (lambda msg: print(msg, file=sys.stderr))
        # every check that needs no data first: preparing the default corpus takes minutes
        if not _resuming and self.is_main:
            check_new_run_dir(self.run_dir)
        cfg.validate()
        self.device = resolve_device(cfg.run.device)
        check_memory(cfg, self.device)
        if not cfg.data.dir:
            cfg.data.dir = str(ensure_default_data(self.progress))
        cfg.data.dir = str(Path(cfg.data.dir).resolve())
        for key in ("config", "init"):  # saved absolute, so --resume works from any directory
            if key in cfg.model:
                cfg.model[key] = str(Path(cfg.model[key]).resolve())
        self.cfg = cfg
        self._resuming = _resuming
        self._interrupted = False
        if self.device.type == "cpu":
            set_cpu_threads(cfg.run.threads, self.echo)
        self.amp_dtype = torch.bfloat16 if cfg.run.dtype in ("bf16", "fp8") else None

        self.train_set = PackedDataset(cfg.data.dir, "train")
        self.val_set = PackedDataset(cfg.data.dir, "val") if self._has_val(cfg.data.dir, cfg.data.seq_len) else None
        self.tokenizer = load_tokenizer(cfg.data.dir)
        meta = self.train_set.meta
        special = {"bos_token_id": meta.get("bos_id"), "eos_token_id": meta["eos_id"],
                   "pad_token_id": meta.get("pad_id")}
        special = {k: v for k, v in special.items() if v is not None}
        self.model_config = cfg.model_config(self.train_set.vocab_size, special)

        seed_everything(cfg.run.seed)
        model = Transformer(self.model_config).to(self.device).train()
        if "init" in cfg.model:
            init_from_model_dir(model, Path(cfg.model["init"]), self.tokenizer, cfg.mtp.depth)
        if cfg.run.dtype == "fp8":  # V3's recipe: FP8 GEMMs in the linear layers, the rest under bf16 autocast
            from ..quant.fp8_training import convert_to_fp8_training
            convert_to_fp8_training(model)
        if cfg.run.activation_checkpointing:  # before any sharding, as torchtitan orders them
            apply_activation_checkpointing(model)
        self.model = self.parallelize(model)
        self.engrams = {f"layers.{layer.layer_idx}": layer.engram for layer in self.model.engram_layers()}
        if self.engrams:  # the tokenizer compression table (a buffer, saved with the weights)
            self.model.set_engram_tokenizer(self.tokenizer)
        self.moes = moe_layers(self.model)
        self._check_balance_settings()
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.engram_optimizer = build_engram_optimizer(self.model, cfg.optim, cfg.engram)  # None without Engram
        # data.batch_size is the global batch: each rank reads its share of every global batch
        self.sampler = BatchSampler(self.train_set, cfg.data.seq_len, cfg.data.batch_size // self.world_size,
                                    seed=cfg.run.seed, rank=self.rank, world_size=self.world_size)
        self.step = self.tokens = 0
        counts = count_parameters(self.model)
        self.n_params = counts
        self.flops_per_token = flops_per_token(self.model_config, counts, cfg.data.seq_len) + self._mtp_flops()
        self.log = MetricsLog(self.run_dir)

        self._created_dir = not self.run_dir.exists()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if not _resuming and self.is_main:
            cfg.save(self.run_dir / RUN_CONFIG)
            self.log.path.unlink(missing_ok=True)

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: list[str] | None = None, **kwargs) -> Trainer:
        """Continue the run in `run_dir` from its latest complete checkpoint (from step 0 if it has none).

        Only `run.*` settings (steps, logging, saving, time limit) and `parallel.*` (the split over
        processes) may be overridden on resume.
        """
        run_dir = Path(run_dir)
        config_path = run_dir / RUN_CONFIG
        if not config_path.is_file():
            raise FileNotFoundError(f"{run_dir} holds no run to resume (no {RUN_CONFIG})")
        cfg = RunConfig.load(config_path)
        bad = [o for o in overrides or [] if not o.strip().startswith(("run.", "parallel."))]
        if bad:
            raise ValueError(f"only run.* and parallel.* settings can change when resuming; not {', '.join(bad)}")
        cfg.apply_overrides(overrides or [])
        trainer = cls(cfg, run_dir, _resuming=True, **kwargs)
        if overrides:
            cfg.save(run_dir / RUN_CONFIG)
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            trainer.echo(f"no checkpoint in {run_dir} yet: starting from step 0")
            trainer.log.truncate_after(0)
            return trainer
        trainer.restore(checkpoint)
        trainer.log.truncate_after(trainer.step)
        trainer.echo(f"resuming {run_dir} from {checkpoint.name} (step {trainer.step}, {trainer.tokens:,} tokens)")
        return trainer

    def restore(self, checkpoint: Path) -> None:
        """Load weights, optimizers, data position and step from `checkpoint`."""
        state = load_checkpoint(checkpoint, self.model, self.optimizers)
        self.check_fingerprint(checkpoint, state)
        self.sampler.load_state_dict(state["sampler"])
        if self.device.type == "cpu" and not self.cfg.run.threads and int(state["threads"]) != torch.get_num_threads():
            self.echo(f"using {state['threads']} CPU thread(s) as before the interruption (the same numerics)")
            torch.set_num_threads(int(state["threads"]))
        self.step, self.tokens = int(state["step"]), int(state["tokens"])

    def check_fingerprint(self, checkpoint: Path, state: dict[str, Any]) -> None:
        if state.get("data_fingerprint") != self.train_set.meta.get("fingerprint"):
            raise CheckpointError(f"{checkpoint} was trained on another dataset than {self.cfg.data.dir} "
                                  "(its fingerprint differs)")

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The optimizers by checkpoint name: `optimizer` (AdamW), and `engram_optimizer` (SparseAdam over
        the Engram tables) when the model has Engram layers."""
        named = {"optimizer": self.optimizer}
        if self.engram_optimizer is not None:
            named["engram_optimizer"] = self.engram_optimizer
        return named

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _has_val(data_dir: str, seq_len: int) -> bool:
        val = PackedDataset(data_dir, "val")
        return len(val) >= seq_len + 1

    def _check_balance_settings(self) -> None:
        b = self.cfg.balance
        if b.bias_update_speed > 0 and any(m.gate.e_score_correction_bias is None for m in self.moes.values()):
            raise ValueError("balance.bias_update_speed > 0 (auxiliary-loss-free balancing) needs routers with a "
                             f"bias (topk_method 'noaux_tc'), but this model uses {self.model_config.topk_method!r}; "
                             "set balance.bias_update_speed=0")

    def _mtp_flops(self) -> float:
        """Training FLOPs per token of the MTP modules: their block, eh_proj and the shared output head."""
        c = self.model_config
        total = 0.0
        for layer in self.model.mtp:
            params = sum(p.numel() for p in layer.parameters())
            if c.is_moe:
                experts = layer.mlp.experts
                routed = experts.gate_up_proj.numel() + experts.down_proj.numel()
                params -= routed - routed * c.num_experts_per_tok // c.n_routed_experts
            attention = 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * (self.cfg.data.seq_len + 1) / 2
            total += 3 * (2 * (params + c.vocab_size * c.hidden_size) + attention)
        return total

    def parallelize(self, model: Transformer) -> Transformer:
        """Where a parallel trainer shards the built model (one process: as built)."""
        return model

    def reduce_loads(self, loads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The step's expert loads over the whole global batch (one process: its own)."""
        return loads

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm to `max_norm`; return the norm before clipping."""
        return clip_grad_norm(self.model.parameters(), max_norm)  # Engram tables' sparse grads included

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ one step
    def losses(self, x: torch.Tensor, y: torch.Tensor, mtp_lambda: float,
               with_mtp: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Main CE, each MTP depth's CE, balance losses and their weighted sum `total` for one micro-batch,
        and the expert loads of the forward (tokens routed to each expert, by MoE layer)."""
        model, cfg = self.model, self.cfg
        routes: dict[str, RouterOutput] = {}  # the routing each MoE layer that ran returned
        with self._autocast():
            h0 = model.hidden_states(x, routes=routes)
            head = model.lm_head.weight  # the cross-entropy never materialises the [tokens, vocab] logits
            out = {"loss": linear_cross_entropy(h0, head, y)}
            total = out["loss"]
            if with_mtp and len(model.mtp):
                mtp = []
                for k, h in enumerate(model.mtp_hidden_states(h0, x, routes=routes), start=1):
                    # h_k predicts t_{i+k+1}
                    out[f"mtp_loss_{k}"] = linear_cross_entropy(model.mtp_head_input(h, k), head, y[:, k:])
                    mtp.append(out[f"mtp_loss_{k}"])
                total = total + mtp_lambda / len(model.mtp) * torch.stack(mtp).sum()
            b = cfg.balance
            if model.training and (b.seq_aux_alpha > 0 or b.aux_loss_alpha > 0):
                balance = torch.zeros((), device=x.device)
                for route in routes.values():
                    if b.seq_aux_alpha > 0:
                        balance = balance + sequence_balance_loss(route, x.shape[0], b.seq_aux_alpha)
                    if b.aux_loss_alpha > 0:
                        balance = balance + expert_balance_loss(route, b.aux_loss_alpha)
                out["balance_loss"] = balance
                total = total + balance
        out["total"] = total
        return out, {name: route.counts for name, route in routes.items()}

    def train_step(self) -> tuple[dict[str, torch.Tensor | float], dict[str, torch.Tensor]]:
        """One optimizer step; returns (scalar metrics, per-layer expert loads of the step). Losses, the
        gradient norm and the loads are tensors on the device: nothing here waits for the device."""
        cfg, steps = self.cfg, self.cfg.run.steps
        lr = cfg.optim.lr * lr_factor(self.step, steps, cfg.schedule, cfg.optim.min_lr_ratio)
        for optimizer in self.optimizers.values():
            set_lr(optimizer, lr)  # Engram tables: lr * engram.lr_multiplier (the group's lr_scale)
        lam = mtp_weight(self.step, steps, cfg.mtp)
        accum = cfg.data.grad_accum
        sums: dict[str, torch.Tensor] = {}
        loads: dict[str, torch.Tensor] = {}
        for _ in range(accum):
            x, y = (t.to(self.device, non_blocking=True) for t in next(self.sampler))
            losses, micro_loads = self.losses(x, y, lam, with_mtp=lam > 0)
            loads = add_loads(loads, micro_loads)
            (losses["total"] / accum).backward()
            for key, value in losses.items():
                value = value.detach() / accum
                sums[key] = sums[key] + value if key in sums else value
        clip = cfg.optim.grad_clip or math.inf
        grad_norm = self.clip_gradients(clip)
        for optimizer in self.optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loads = self.reduce_loads(loads)
        gamma = bias_update_speed(self.step, steps, cfg.balance)
        if gamma > 0:
            for name, counts in loads.items():  # layers that ran (an unused one would not move)
                update_bias(self.moes[name], counts, gamma)
        self.step += 1
        self.tokens += cfg.tokens_per_step
        sums.pop("total")
        return {**sums, "lr": lr, "grad_norm": grad_norm.detach(), "mtp_weight": lam, "bias_update_speed": gamma}, loads

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean validation CE (main and each MTP depth) over `data.eval_batches`, perplexity, MaxVio of
        each MoE layer over all validation tokens (MaxVio_global), and the mean Engram gate alpha of
        each Engram layer over all validation tokens."""
        if self.val_set is None:
            return {}
        model, cfg = self.model, self.cfg
        model.eval()
        counts: dict[str, torch.Tensor] = {}
        gates = {name: torch.zeros((), device=self.device) for name in self.engrams}
        for engram in self.engrams.values():
            engram.keep_gate = True
        sums: dict[str, torch.Tensor] = {}  # on the device until the end (no host sync per batch)
        n_tokens: dict[str, int] = {}
        try:
            limit = cfg.data.eval_batches or None
            for x, y in eval_batches(self.val_set, cfg.data.seq_len, cfg.data.batch_size, limit):
                x, y = x.to(self.device), y.to(self.device)
                losses, loads = self.losses(x, y, 0.0, with_mtp=True)
                counts = add_loads(counts, loads)
                for key, value in losses.items():
                    if key == "total":
                        continue
                    k = int(key.rsplit("_", 1)[1]) if key.startswith("mtp_loss_") else 0
                    n = x.shape[0] * (x.shape[1] - k)
                    value = value.detach().double() * n
                    sums[key] = sums[key] + value if key in sums else value
                    n_tokens[key] = n_tokens.get(key, 0) + n
                for name, engram in self.engrams.items():
                    gates[name] += engram.last_gate.detach().sum().to(gates[name].dtype)
        finally:
            for engram in self.engrams.values():
                engram.keep_gate, engram.last_gate = False, None
            model.train()
        out: dict[str, Any] = {f"val_{k}": v / n_tokens[k] for k, v in zip(sums, to_host(list(sums.values())))}
        out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
        if counts:
            maxvio = {name: round(max_violation(c), 5) for name, c in counts.items()}
            out["val_maxvio"] = maxvio
            out["val_maxvio_mean"] = round(sum(maxvio.values()) / len(maxvio), 5)
        if gates:
            totals = to_host(list(gates.values()))
            out["val_engram_gate"] = {name: round(t / n_tokens["loss"], 5) for name, t in zip(gates, totals)}
        return out

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        """Run steps until `run.steps` (or the time limit), logging, evaluating and saving on the way.

        Ctrl-C stops at the end of the current step, saves a checkpoint, says how to resume and raises
        KeyboardInterrupt (a second Ctrl-C stops at once). A run that fails before its first step
        completes leaves nothing behind that would block the next attempt in the same directory."""
        cfg, run = self.cfg, self.cfg.run
        start = time.perf_counter()
        deadline = start + run.max_minutes * 60 if run.max_minutes > 0 else math.inf
        peak = measure_matmul_peak(self.device, self.amp_dtype or torch.float32)
        if self.step == 0:
            c = self.n_params
            self.echo(f"model: {c.total / 1e6:.2f}M parameters ({c.active / 1e6:.2f}M active per token, "
                      f"+{c.mtp / 1e6:.2f}M MTP); {cfg.tokens_per_step:,} tokens per step; "
                      f"matmul peak {peak / 1e9:.0f} GFLOP/s ({run.dtype})")
        interval = Interval()
        last_train: dict[str, Any] = {}
        last_val: dict[str, Any] = {}
        stopped_by_time = False
        fit_at = max(3, cfg.schedule.warmup_steps) if run.fit_to_time and run.max_minutes > 0 else 0
        after_first = start
        first_step = self.step
        self._interrupted = False
        bar = tqdm(total=run.steps, initial=self.step, unit="step", disable=not self.progress, dynamic_ncols=True)
        try:
            with self._stop_on_interrupt():
                while self.step < run.steps and not self._interrupted:
                    if time.perf_counter() >= deadline:
                        stopped_by_time = True
                        break
                    scalars, loads = self._checked_step()
                    if self.step == 1:
                        after_first = time.perf_counter()  # the first step is slower (allocation, kernel setup)
                    if fit_at and self.step == fit_at:
                        self._fit_to_time(deadline, (time.perf_counter() - after_first) / (self.step - 1), bar)
                    interval.add(scalars, loads, cfg.tokens_per_step)
                    bar.update(1)
                    if self.step % run.log_every == 0 or self.step == run.steps:
                        last_train = self._log_train(interval, peak, bar)
                        interval = Interval()
                    if run.eval_every and self.step % run.eval_every == 0 and self.step < run.steps:
                        with interval.paused():  # evaluation time is not training throughput
                            last_val = self._log_val(bar) or last_val
                    if run.save_every and self.step % run.save_every == 0 and self.step < run.steps:
                        with interval.paused():
                            self.save()
            if interval.steps:  # a partial interval left by the time limit or an interrupt
                last_train = self._log_train(interval, peak, bar)
        except BaseException:
            if not self._resuming and self.step == first_step == 0:
                self._discard_failed_start()
            raise
        finally:
            bar.close()
        if self._interrupted:
            checkpoint = self.save()
            self.echo(f"stopped at step {self.step}: saved {checkpoint}; continue with: "
                      f"seekformer train --resume {self.run_dir}")
            raise KeyboardInterrupt
        if last_val.get("step") != self.step:  # not evaluated at this step yet (a time limit can stop right after)
            last_val = self._log_val(None) or last_val
        checkpoint = self.save()
        final = self.save_final()
        return TrainResult(self.run_dir, self.step, self.tokens, final, checkpoint, last_train, last_val,
                           stopped_by_time)

    def _checked_step(self) -> tuple[dict[str, torch.Tensor | float], dict[str, torch.Tensor]]:
        """`train_step`, with an allocator failure reported in words."""
        try:
            return self.train_step()
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            error = allocation_error(exc, self.cfg.data.batch_size, self.cfg.data.seq_len, self.device)
            if error is None:
                raise
            raise error from None

    @contextlib.contextmanager
    def _stop_on_interrupt(self):
        """While inside, the first Ctrl-C (SIGINT) sets `_interrupted` (the loop stops at the end of the
        step: a checkpoint of a half-applied step would be worthless); a second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)

        def on_interrupt(signum, frame):
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True
            self.echo(f"\ninterrupted: saving a checkpoint after step {self.step + 1} "
                      "(Ctrl-C again to stop at once, losing the steps since the last checkpoint)")

        signal.signal(signal.SIGINT, on_interrupt)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)

    def _discard_failed_start(self) -> None:
        """Remove what this new run wrote before its first step failed, so that the next attempt with the
        same --out starts cleanly (there is nothing to resume)."""
        (self.run_dir / RUN_CONFIG).unlink(missing_ok=True)
        self.log.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (self.run_dir / CHECKPOINTS).rmdir()  # only if empty
        if self._created_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()

    def _fit_to_time(self, deadline: float, step_seconds: float, bar) -> None:
        """Set run.steps to what fits before `deadline` at `step_seconds` per step, leaving time for the
        evaluations; log, eval and save intervals scale with it. Called at the end of warmup, where the
        learning rate does not depend on the run's length, so the schedule stays a clean one."""
        run, data = self.cfg.run, self.cfg.data
        val_tokens = len(self.val_set) if self.val_set is not None else 0
        val_batches = data.eval_batches or math.ceil(val_tokens / (data.seq_len * data.batch_size))
        eval_seconds = val_batches * step_seconds / (3 * data.grad_accum)  # a forward pass: ~1/3 of a step
        remaining = 0.97 * (deadline - time.perf_counter())
        left = remaining / step_seconds
        for _ in range(3):  # the evaluation interval scales with the length it helps to decide
            every = max(1.0, run.eval_every * (self.step + left) / run.steps) if run.eval_every else math.inf
            left = remaining / (step_seconds + eval_seconds / every)
        steps = self.step + max(int(left), 1)
        scale = steps / run.steps
        for name in ("log_every", "eval_every", "save_every"):
            if getattr(run, name):
                setattr(run, name, max(1, round(getattr(run, name) * scale)))
        run.steps = steps
        self.cfg.save(self.run_dir / RUN_CONFIG)
        if bar is not None and not bar.disable:
            bar.total = steps
            bar.refresh()
        self.echo(f"fitted the schedule to the time budget: {steps} steps ({step_seconds:.2f} s per step)")

    def _log_train(self, interval: Interval, peak: float, bar) -> dict[str, Any]:
        tok_s = interval.tokens / max(interval.seconds, 1e-9)
        record: dict[str, Any] = {"kind": "train", "step": self.step, "tokens": self.tokens}
        record.update(interval.means())  # here, and only here, training statistics cross to the host
        record.update({"tokens_per_s": round(tok_s, 1), "mfu": round(self.flops_per_token * tok_s / peak, 5)})
        record.update(interval.loads.summary())
        self.log.write(record)
        postfix = {"loss": f"{record['loss']:.3f}"}
        if "mtp_loss_1" in record:
            postfix["mtp"] = f"{record['mtp_loss_1']:.3f}"
        postfix.update({"lr": f"{record['lr']:.1e}", "tok/s": f"{tok_s:,.0f}", "mfu": f"{100 * record['mfu']:.1f}%"})
        if "maxvio_mean" in record:
            postfix["maxvio"] = f"{record['maxvio_mean']:.2f}"
        if bar is not None and not bar.disable:
            bar.set_postfix(postfix, refresh=False)
        else:
            self.echo(f"step {self.step}/{self.cfg.run.steps} " + " ".join(f"{k} {v}" for k, v in postfix.items()))
        return record

    def _log_val(self, bar) -> dict[str, Any]:
        metrics = self.evaluate()
        if not metrics:
            return {}
        record = {"kind": "val", "step": self.step, "tokens": self.tokens, **metrics}
        self.log.write(record)
        msg = f"step {self.step}: val loss {metrics['val_loss']:.4f} (ppl {metrics['val_ppl']:.1f})"
        if "val_maxvio_mean" in metrics:
            msg += f", val MaxVio {metrics['val_maxvio_mean']:.3f}"
        if "val_engram_gate" in metrics:
            msg += ", Engram gate " + " ".join(f"{g:.3f}" for g in metrics["val_engram_gate"].values())
        (bar.write if bar is not None and not bar.disable else self.echo)(msg)
        return record

    # ------------------------------------------------------------------ saving
    def save(self) -> Path:
        state = {"step": self.step, "tokens": self.tokens, "sampler": self.sampler.state_dict(),
                 "data_fingerprint": self.train_set.meta.get("fingerprint"), "threads": torch.get_num_threads()}
        return save_checkpoint(self.run_dir, self.model, self.optimizers, state, self.tokenizer, self.cfg.run.keep_last)

    def save_final(self) -> Path:
        """The trained model as a hub-layout directory `RUN/final` (with the tokenizer)."""
        final = self.run_dir / FINAL
        tmp = self.run_dir / f".tmp-{FINAL}-{os.getpid()}"
        write_model_dir(self.model, self.tokenizer, tmp)
        publish_dir(tmp, final)
        return final


def init_from_model_dir(model: Transformer, directory: Path, tokenizer, mtp_depth: int) -> None:
    """Load the weights of `directory` (model.init) into a freshly built model, after checking that the
    run's tokenizer is the one the model was trained with and that the MTP depth matches."""
    config, skipped_layers = checkpoint_config(directory)  # MTP modules whose weights are there
    saved = config.num_nextn_predict_layers
    if saved != mtp_depth:
        raise ValueError(f"{directory} has {saved} MTP module(s) but mtp.depth is {mtp_depth}; "
                         f"set mtp.depth={saved} to continue from it")
    if (directory / "tokenizer.json").is_file():
        theirs = load_tokenizer(directory).backend.get_vocab(with_added_tokens=True)
        if theirs != tokenizer.backend.get_vocab(with_added_tokens=True):
            raise ValueError(f"the dataset's tokenizer is not the one of {directory} (the vocabularies differ); "
                             "prepare the data with that tokenizer")
    with torch.no_grad():
        load_state_into(model, directory, skip_layers=skipped_layers)
    model.reset_buffers()


def check_new_run_dir(run_dir: Path) -> None:
    """A new run needs a directory that holds no run (and is a directory, if it exists)."""
    if (run_dir / RUN_CONFIG).exists():
        raise ValueError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                         "or choose another output directory")
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} exists and is not a directory: choose another output directory")


def check_memory(cfg: RunConfig, device: torch.device) -> None:
    """Refuse a run whose memory lower bound exceeds the device's memory, before any data is prepared:
    parameters are counted on the meta device, without the embedding and output head (their size
    depends on the dataset's vocabulary)."""
    config = cfg.model_config()
    with torch.device("meta"):
        counts = count_parameters(Transformer(config))
    check_fits(config, counts.total - counts.embedding, cfg.data.batch_size, cfg.data.seq_len, device,
               moment_bytes=2 if cfg.optim.moment_dtype == "bf16" else 4)


def seed_everything(seed: int) -> None:
    """Seed the global generators a run may draw from: torch (CPU and CUDA), Python's and NumPy's.
    All of them are saved in checkpoints and restored on resume."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
