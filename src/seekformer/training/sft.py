"""Supervised fine-tuning (and logit distillation) of a model loaded from a directory.

`SFTTrainer(cfg, run_dir).train()` loads the model `cfg.model.dir` names (seekformer's or one written
by transformers) with the tokenizer found beside it, trains it on chat data with the loss on the
assistant tokens only (`chat_data.py`), and writes what `seekformer train` writes: `metrics.jsonl`,
PNG plots, atomic resumable checkpoints in the hub layout and `RUN/final`. The pieces are the
pretraining run's: AdamW param groups and schedules (`optim.py`), checkpoints (`checkpointing.py`),
the metrics log and plots, the chunked output-head cross-entropy.

One optimizer step: `grad_accum` micro-batches; the loss is the mean over every assistant token of
the step (so packed and unpacked batches, and any split into micro-batches, give the same step).
With a teacher (`loss.teacher`) the loss is `(1 - kl_weight) * CE + kl_weight * KL(teacher || student)`
per assistant token, computed without full logits (`linear_kl_divergence`).

Fine-tuning defaults: lr 1e-4 with warmup and cosine decay to 10%, no weight decay, and the
auxiliary-loss-free router bias frozen (`balance.bias_update_speed = 0`); parameters can be frozen by
name (`model.freeze`).

Under torchrun, `seekformer.distributed.post_training.DistributedSFTTrainer` runs this loop data
parallel through the hooks `parallelize`, `reduce_sums`, `clip_gradients`, `restore`, `save`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import math
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..checkpoint import CheckpointError
from ..model.moe import RouterOutput
from ..model.transformer import Transformer
from ..runtime import resolve_device, set_cpu_threads
from ..tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from .balance import add_loads, max_violation, moe_layers, update_bias
from .chat_data import IGNORE, ChatBatch, ChatBatches, eval_chat_batches, read_chat_jsonl, tokenize_records
from .checkpointing import latest_checkpoint, load_checkpoint, publish_dir, save_checkpoint, write_model_dir
from .cross_entropy import linear_cross_entropy, linear_kl_divergence
from .metrics import LoadMeter, MetricsLog
from .optim import build_engram_optimizer, build_optimizer, lr_factor, set_lr
from .post_training_hooks import OneProcessHooks
from .run_config import (
    DEVICES,
    DTYPES,
    MOMENT_DTYPES,
    SCHEDULES,
    EngramSection,
    OptimSection,
    ParallelSection,
    RunConfigError,
    ScheduleSection,
    _coerce,
    parse_value,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

RUN_CONFIG = "sft_config.json"
FINAL = "final"

# `model.freeze` shorthands -> parameter name patterns
FREEZE_GROUPS = {
    "embeddings": ["model.embed_tokens.*"],
    "head": ["lm_head.*"],
    "router": ["*.mlp.gate.*"],
    "experts": ["*.mlp.experts.*"],
    "attention": ["*.self_attn.*"],
    "norms": ["*norm*"],
    "mtp": ["mtp.*"],
}


# ---------------------------------------------------------------------------- configuration
@dataclass
class SFTModelSection:
    dir: str = ""  # the model to start from: any directory load_model reads
    tokenizer: str = ""  # "" = the model directory's tokenizer
    freeze: list[str] = field(default_factory=list)  # name patterns (fnmatch) or groups: see FREEZE_GROUPS


@dataclass
class SFTDataSection:
    train: str = ""  # JSONL of {"messages": [...]} or {"prompt", "completion"} records
    val: str = ""  # JSONL for validation; "" = hold out val_fraction of the training records
    val_fraction: float = 0.05
    max_len: int = 0  # tokens per sequence; 0 = the model's max_position_embeddings
    truncate: bool = False  # cut sequences longer than max_len (else an error naming the record)
    packing: bool = False  # several examples per row of max_len, attention kept within each
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1


@dataclass
class SFTLossSection:
    teacher: str = ""  # a model directory: logit distillation (forward KL) from it; "" = off
    kl_weight: float = 0.5  # loss = (1 - kl_weight) * CE + kl_weight * KL, with a teacher
    temperature: float = 1.0  # of both distributions in the KL
    mtp_weight: float = 0.0  # weight of the MTP modules' CE (their own next-next targets); 0 = not trained


@dataclass
class SFTBalanceSection:
    bias_update_speed: float = 0.0  # gamma of the aux-loss-free router bias; 0 keeps the bias frozen


@dataclass
class SFTRunSection:
    steps: int = 0  # optimizer steps; 0 = `epochs` passes over the training data
    epochs: float = 1.0
    max_minutes: float = 0.0  # stop at a step boundary after this much time; 0 = no limit
    seed: int = 0  # data order
    dtype: str = "bf16"  # autocast compute dtype (weights and optimizer stay float32)
    device: str = "auto"
    threads: int = 0  # CPU threads; 0 = automatic
    log_every: int = 10
    eval_every: int = 100  # 0 = only at the end
    save_every: int = 200  # 0 = only at the end
    keep_last: int = 3


def _fine_tuning_optim() -> OptimSection:
    return OptimSection(lr=1e-4, min_lr_ratio=0.1, weight_decay=0.0)


def _fine_tuning_schedule() -> ScheduleSection:
    return ScheduleSection(kind="cosine", warmup_steps=10)


SFT_SECTIONS: dict[str, type] = {
    "model": SFTModelSection, "data": SFTDataSection, "loss": SFTLossSection, "optim": OptimSection,
    "schedule": ScheduleSection, "balance": SFTBalanceSection, "engram": EngramSection, "run": SFTRunSection,
    "parallel": ParallelSection,  # torchrun jobs: data parallel only (see seekformer.distributed.post_training)
}


@dataclass
class SFTConfig:
    model: SFTModelSection = field(default_factory=SFTModelSection)
    data: SFTDataSection = field(default_factory=SFTDataSection)
    loss: SFTLossSection = field(default_factory=SFTLossSection)
    optim: OptimSection = field(default_factory=_fine_tuning_optim)
    schedule: ScheduleSection = field(default_factory=_fine_tuning_schedule)
    balance: SFTBalanceSection = field(default_factory=SFTBalanceSection)
    engram: EngramSection = field(default_factory=EngramSection)
    run: SFTRunSection = field(default_factory=SFTRunSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "sft config") -> SFTConfig:
        cfg = cls()
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise RunConfigError(f"{source}: [{section}] must be a table of settings, got {values!r}")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value, source)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> SFTConfig:
        """A TOML file, or the `sft_config.json` a run directory holds."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sft config {path} not found")
        try:
            raw = json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise RunConfigError(f"{path}: cannot parse ({exc})") from exc
        return cls.from_dict(raw, str(path))

    def set(self, key: str, value: Any, source: str = "--set") -> None:
        section, _, name = key.partition(".")
        if section not in SFT_SECTIONS or not name:
            raise RunConfigError(f"{source}: unknown setting {key!r}; sections: {', '.join(SFT_SECTIONS)}")
        target = getattr(self, section)
        hints = typing.get_type_hints(type(target))
        if name not in hints:
            raise RunConfigError(f"{source}: unknown setting {key!r}; [{section}] has: {', '.join(hints)}")
        setattr(target, name, _coerce(value, hints[name], f"{source}: {key}"))

    def apply_overrides(self, items: list[str]) -> None:
        for item in items:
            key, sep, text = item.partition("=")
            if not sep:
                raise RunConfigError(f"--set {item!r}: expected section.key=value")
            self.set(key.strip(), parse_value(text.strip()), f"--set {key.strip()}")
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise RunConfigError(f"invalid sft config: {msg}")

        d, o, s, r, loss = self.data, self.optim, self.schedule, self.run, self.loss
        need(d.batch_size >= 1 and d.grad_accum >= 1, "data.batch_size and data.grad_accum must be >= 1")
        need(d.max_len >= 0, f"data.max_len must be >= 0 (0 = the model's context), got {d.max_len}")
        need(0 <= d.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
        need(o.lr > 0 and 0 <= o.min_lr_ratio <= 1, "optim.lr must be > 0 and optim.min_lr_ratio in [0, 1]")
        need(o.weight_decay >= 0 and o.grad_clip >= 0 and o.eps > 0 and 0 <= o.beta1 < 1 and 0 <= o.beta2 < 1,
             "optim: weight_decay and grad_clip >= 0, eps > 0, betas in [0, 1)")
        need(o.moment_dtype in MOMENT_DTYPES,
             f"optim.moment_dtype must be one of {', '.join(MOMENT_DTYPES)}, got {o.moment_dtype!r}")
        need(s.kind in SCHEDULES, f"schedule.kind must be one of {', '.join(SCHEDULES)}, got {s.kind!r}")
        need(s.warmup_steps >= 0 and 0 <= s.decay_fraction <= 1, "schedule.warmup_steps >= 0, decay_fraction in [0, 1]")
        need(0 <= loss.kl_weight <= 1, f"loss.kl_weight must be in [0, 1], got {loss.kl_weight}")
        need(loss.temperature > 0 and loss.mtp_weight >= 0, "loss.temperature must be > 0, loss.mtp_weight >= 0")
        need(not (d.packing and loss.mtp_weight > 0), "loss.mtp_weight > 0 cannot be combined with data.packing "
             "(the MTP modules do not see the packed sequences' boundaries)")
        need(self.balance.bias_update_speed >= 0, "balance.bias_update_speed must be >= 0")
        need(r.steps >= 0 and r.epochs > 0, f"run.steps must be >= 0 and run.epochs > 0, got {r.steps}, {r.epochs}")
        need(r.max_minutes >= 0 and r.threads >= 0, "run.max_minutes and run.threads must be >= 0")
        need(r.dtype in DTYPES, f"run.dtype must be one of {', '.join(DTYPES)}, got {r.dtype!r}")
        need(r.device in DEVICES, f"run.device must be one of {', '.join(DEVICES)}, got {r.device!r}")
        need(r.log_every >= 1 and r.eval_every >= 0 and r.save_every >= 0 and r.keep_last >= 1,
             "run.log_every and run.keep_last must be >= 1, run.eval_every and run.save_every >= 0")
        need(self.parallel.ep >= 1 and self.parallel.dp_shard >= 0 and self.parallel.timeout_s > 0,
             "parallel.ep must be >= 1, parallel.dp_shard >= 0, parallel.timeout_s > 0")

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SFT_SECTIONS}

    def save(self, path: str | Path) -> Path:
        from ..io_utils import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


# ---------------------------------------------------------------------------- starting from weights
def load_model_and_tokenizer(model_dir: str | Path, tokenizer_dir: str | Path | None = None,
                             device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer]:
    """The model in `model_dir` (float32, for training) and the tokenizer beside it (or in
    `tokenizer_dir`); an error naming the directory when there is none or it does not fit the model."""
    model_dir = Path(model_dir)
    source = Path(tokenizer_dir) if tokenizer_dir else model_dir
    if not (source / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{source} holds no tokenizer ({TOKENIZER_FILE}): fine-tuning needs the tokenizer the "
                                "model was trained with; copy it there or name its directory (--tokenizer)")
    tokenizer = load_tokenizer(source)
    model = Transformer.from_pretrained(model_dir, dtype=torch.float32, device=device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer in {source} has {tokenizer.vocab_size} ids but the model in {model_dir} "
                         f"only {model.config.vocab_size} embeddings: they do not belong together")
    return model, tokenizer


def freeze_parameters(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """Set requires_grad=False on the parameters whose names match a pattern (fnmatch, or a group of
    FREEZE_GROUPS); returns their names. A pattern that matches nothing is an error."""
    named = dict(model.named_parameters())
    frozen: list[str] = []
    for pattern in patterns:
        globs = FREEZE_GROUPS.get(pattern, [pattern])
        hits = [name for name in named if any(fnmatch.fnmatchcase(name, g) for g in globs)]
        if not hits:
            raise ValueError(f"model.freeze pattern {pattern!r} matches no parameter (names look like "
                             f"{next(iter(named))!r}; groups: {', '.join(FREEZE_GROUPS)})")
        for name in hits:
            named[name].requires_grad_(False)
            if name not in frozen:
                frozen.append(name)
    return frozen


def check_same_vocabulary(student: Transformer, student_tokenizer: Tokenizer, teacher: Transformer,
                          teacher_dir: Path) -> None:
    """Logit distillation compares distributions id by id: the vocabularies must be the same."""
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ValueError(f"teacher and student vocabularies differ: {teacher_dir} has {teacher.config.vocab_size} "
                         f"output ids, the student {student.config.vocab_size}; logit distillation needs one shared "
                         "tokenizer (distil by SFT on generated traces instead)")
    if (teacher_dir / TOKENIZER_FILE).is_file():
        theirs = load_tokenizer(teacher_dir).backend.get_vocab(with_added_tokens=True)
        if theirs != student_tokenizer.backend.get_vocab(with_added_tokens=True):
            raise ValueError(f"teacher and student vocabularies differ: the tokenizer in {teacher_dir} maps tokens to "
                             "other ids than the student's; logit distillation needs one shared tokenizer")


def _fingerprint(*paths: str) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path:
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class SFTResult:
    run_dir: Path
    step: int
    tokens: int
    final_dir: Path
    checkpoint: Path
    train: dict[str, Any] = field(default_factory=dict)
    val: dict[str, Any] = field(default_factory=dict)
    stopped_by_time: bool = False


# ---------------------------------------------------------------------------- the trainer
class SFTTrainer(OneProcessHooks):
    """`SFTTrainer(cfg, run_dir)` starts a run (the directory must not hold one);
    `SFTTrainer.resume(run_dir)` continues one from its latest checkpoint."""

    # a data-parallel subclass (seekformer.distributed.post_training) sets these before __init__
    rank, world_size, is_main = 0, 1, True

    def __init__(self, cfg: SFTConfig, run_dir: str | Path, progress: bool | None = None,
                 echo: Callable[[str], None] | None = None, _resuming: bool = False):
        self.run_dir = Path(run_dir)
        if not _resuming and self.is_main and (self.run_dir / RUN_CONFIG).exists():
            raise ValueError(f"{self.run_dir} already holds a run; continue it with --resume {self.run_dir} "
                             "or choose another output directory")
        if not cfg.model.dir:
            raise ValueError("no model to fine-tune: set model.dir (--model DIR)")
        if not cfg.data.train:
            raise ValueError("no training data: set data.train (--data FILE.jsonl)")
        for section, key in (("model", "dir"), ("model", "tokenizer"), ("data", "train"), ("data", "val"),
                             ("loss", "teacher")):
            value = getattr(getattr(cfg, section), key)
            if value:  # saved absolute, so --resume works from any directory
                setattr(getattr(cfg, section), key, str(Path(value).resolve()))
        self.cfg = cfg
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.echo = echo or (lambda msg: print(msg, file=sys.stderr))
        self.device = resolve_device(cfg.run.device)
        if self.device.type == "cpu":
            set_cpu_threads(cfg.run.threads, self.echo)
        self.amp_dtype = torch.bfloat16 if cfg.run.dtype == "bf16" else None

        self.model, self.tokenizer = load_model_and_tokenizer(cfg.model.dir, cfg.model.tokenizer or None, self.device)
        self.model.train()
        self.max_len = cfg.data.max_len or self.model.config.max_position_embeddings
        self.train_examples, self.val_examples = self._examples()
        self.frozen = freeze_parameters(self.model, cfg.model.freeze)
        self.model = self.parallelize(self.model)
        self.teacher = None
        if cfg.loss.teacher:
            teacher_dir = Path(cfg.loss.teacher)
            self.teacher = Transformer.from_pretrained(teacher_dir, dtype=torch.float32, device=self.device)
            self.teacher.eval().requires_grad_(False)
            check_same_vocabulary(self.model, self.tokenizer, self.teacher, teacher_dir)
        self.moes = moe_layers(self.model)
        unbiased = any(m.gate.e_score_correction_bias is None for m in self.moes.values())
        if cfg.balance.bias_update_speed > 0 and unbiased:
            raise ValueError("balance.bias_update_speed > 0 needs routers with a bias (topk_method 'noaux_tc')")
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.engram_optimizer = build_engram_optimizer(self.model, cfg.optim, cfg.engram)
        self.batches = ChatBatches(self.train_examples, cfg.data.batch_size, self.max_len, self.tokenizer.pad_id,
                                   cfg.data.packing, cfg.run.seed, self.rank, self.world_size)
        self.steps = cfg.run.steps or max(1, math.ceil(cfg.run.epochs * len(self.batches) / cfg.data.grad_accum))
        self.step = self.tokens = 0
        self.fingerprint = _fingerprint(cfg.data.train, cfg.data.val)
        self.log = MetricsLog(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not _resuming and self.is_main:
            cfg.save(self.run_dir / RUN_CONFIG)
            self.log.path.unlink(missing_ok=True)

    def _examples(self):
        cfg = self.cfg.data
        records = read_chat_jsonl(cfg.train)
        if cfg.val:
            val_records = read_chat_jsonl(cfg.val)
        else:  # a seeded hold-out of the training records
            n_val = int(len(records) * cfg.val_fraction)
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(self.cfg.run.seed)).tolist()
            held = set(order[:n_val])
            val_records = [r for i, r in enumerate(records) if i in held]
            records = [r for i, r in enumerate(records) if i not in held]
        train = tokenize_records(self.tokenizer, records, self.max_len, cfg.truncate)
        val = tokenize_records(self.tokenizer, val_records, self.max_len, cfg.truncate)
        return train, val

    @classmethod
    def resume(cls, run_dir: str | Path, overrides: list[str] | None = None, **kwargs) -> SFTTrainer:
        """Continue the run in `run_dir` from its latest checkpoint; only run.* and parallel.* settings may
        change."""
        run_dir = Path(run_dir)
        if not (run_dir / RUN_CONFIG).is_file():
            raise FileNotFoundError(f"{run_dir} holds no SFT run to resume (no {RUN_CONFIG})")
        cfg = SFTConfig.load(run_dir / RUN_CONFIG)
        bad = [o for o in overrides or [] if not o.strip().startswith(("run.", "parallel."))]
        if bad:
            raise ValueError(f"only run.* and parallel.* settings can change when resuming; not {', '.join(bad)}")
        cfg.apply_overrides(overrides or [])
        trainer = cls(cfg, run_dir, _resuming=True, **kwargs)
        if overrides and trainer.is_main:
            cfg.save(run_dir / RUN_CONFIG)
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            trainer.log.truncate_after(0)
            return trainer
        trainer.restore(checkpoint)
        trainer.log.truncate_after(trainer.step)
        trainer.echo(f"resuming {run_dir} from {checkpoint.name} (step {trainer.step})")
        return trainer

    def restore(self, checkpoint: Path) -> None:
        """Load weights, optimizers, data position and step from `checkpoint`."""
        self._continue_from(checkpoint, load_checkpoint(checkpoint, self.model, self.optimizers))

    def _continue_from(self, checkpoint: Path, state: dict[str, Any]) -> None:
        if state.get("data_fingerprint") != self.fingerprint:
            raise CheckpointError(f"{checkpoint} was trained on other data than {self.cfg.data.train} (its "
                                  "fingerprint differs)")
        self.batches.load_state_dict(state["batches"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        named = {"optimizer": self.optimizer}
        if self.engram_optimizer is not None:
            named["engram_optimizer"] = self.engram_optimizer
        return named

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ one step
    def losses(self, batch: ChatBatch) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Sums over the batch's assistant tokens: `ce` (and `kl`, `mtp_ce_k`) and the weighted `total`;
        and the expert loads of the forward (tokens routed to each expert, by MoE layer)."""
        model, loss_cfg = self.model, self.cfg.loss
        x, y, docs = batch.inputs, batch.targets, batch.document_ids
        routes: dict[str, RouterOutput] = {}
        with self._autocast():
            h = model.hidden_states(x, document_ids=docs, routes=routes)
            head = model.lm_head.weight
            out = {"ce": linear_cross_entropy(h, head, y, reduction="sum")}
            total = out["ce"]
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_h = self.teacher.hidden_states(x, document_ids=docs)
                out["kl"] = linear_kl_divergence(h, head, teacher_h, self.teacher.lm_head.weight, mask=y != IGNORE,
                                                 temperature=loss_cfg.temperature, reduction="sum")
                total = (1 - loss_cfg.kl_weight) * total + loss_cfg.kl_weight * out["kl"]
            if loss_cfg.mtp_weight > 0 and len(model.mtp):
                for k, h_k in enumerate(model.mtp_hidden_states(h, x, routes=routes), start=1):
                    out[f"mtp_ce_{k}"] = linear_cross_entropy(model.mtp_head_input(h_k, k), head, y[:, k:],
                                                              reduction="sum")
                    total = total + loss_cfg.mtp_weight / len(model.mtp) * out[f"mtp_ce_{k}"]
        out["total"] = total
        return out, {name: route.counts for name, route in routes.items()}

    def train_step(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        cfg = self.cfg
        lr = cfg.optim.lr * lr_factor(self.step, self.steps, cfg.schedule, cfg.optim.min_lr_ratio)
        for optimizer in self.optimizers.values():
            set_lr(optimizer, lr)
        batches = [next(self.batches) for _ in range(cfg.data.grad_accum)]  # this rank's rows of each
        counts = self.reduce_sums({"targets": torch.tensor(sum(b.n_targets for b in batches)),
                                   "tokens": torch.tensor(sum(b.n_tokens for b in batches))})
        n_targets, tokens = int(counts["targets"]), int(counts["tokens"])
        sums: dict[str, float] = {}
        loads: dict[str, torch.Tensor] = {}
        for batch in batches:
            losses, batch_loads = self.losses(batch.to(self.device))
            loads = add_loads(loads, batch_loads)
            # data parallel: the ranks' gradients are averaged, so each rank's token sum is scaled by their number
            (losses["total"] * self.world_size / max(n_targets, 1)).backward()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value.item()
        sums = {k: float(v) for k, v in self.reduce_sums({k: torch.tensor(v, dtype=torch.float64)
                                                          for k, v in sums.items()}).items()}
        grad_norm = self.clip_gradients(cfg.optim.grad_clip or math.inf)
        for optimizer in self.optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loads = self.reduce_sums(loads)
        if cfg.balance.bias_update_speed > 0:
            for name, counts in loads.items():  # layers that ran (an unused one would not move)
                update_bias(self.moes[name], counts, cfg.balance.bias_update_speed)
        self.step += 1
        self.tokens += tokens
        sums.pop("total")
        metrics = {("loss" if k == "ce" else k): v / max(n_targets, 1) for k, v in sums.items()}
        metrics.update({"lr": lr, "grad_norm": float(grad_norm), "targets": n_targets, "step_tokens": tokens})
        return metrics, loads

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean CE (and KL to the teacher) over the assistant tokens of the validation examples."""
        if not self.val_examples:
            return {}
        self.model.eval()
        sums: dict[str, float] = {}
        n = 0
        counts: dict[str, torch.Tensor] = {}
        try:
            for batch in eval_chat_batches(self.val_examples, self.cfg.data.batch_size, self.tokenizer.pad_id,
                                           self.rank, self.world_size):
                losses, loads = self.losses(batch.to(self.device))
                counts = add_loads(counts, loads)
                for key, value in losses.items():
                    if key != "total":
                        sums[key] = sums.get(key, 0.0) + value.item()
                n += batch.n_targets
        finally:
            self.model.train()
        totals = self.reduce_sums({**{k: torch.tensor(v, dtype=torch.float64) for k, v in sums.items()},
                                   "targets": torch.tensor(n)})
        n = int(totals.pop("targets"))
        sums = {k: float(v) for k, v in totals.items()}
        counts = self.reduce_sums(counts)
        out: dict[str, Any] = {("val_loss" if k == "ce" else f"val_{k}"): v / max(n, 1) for k, v in sums.items()}
        out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
        if counts:
            maxvio = {name: round(max_violation(c), 5) for name, c in counts.items()}
            out["val_maxvio"], out["val_maxvio_mean"] = maxvio, round(sum(maxvio.values()) / len(maxvio), 5)
        return out

    # ------------------------------------------------------------------ the loop
    def train(self) -> SFTResult:
        run = self.cfg.run
        start = time.perf_counter()
        deadline = start + run.max_minutes * 60 if run.max_minutes > 0 else math.inf
        if self.step == 0:
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            total = sum(p.numel() for p in self.model.parameters())
            self.echo(f"fine-tuning {self.cfg.model.dir}: {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters "
                      f"trainable; {len(self.train_examples)} training and {len(self.val_examples)} validation "
                      f"sequences; {self.steps} steps")
        meter, sums, n_steps, tokens = LoadMeter(), {}, 0, 0
        last_train: dict[str, Any] = {}
        last_val: dict[str, Any] = {}
        interval_start = time.perf_counter()
        stopped_by_time = False
        bar = tqdm(total=self.steps, initial=self.step, unit="step", disable=not self.progress, dynamic_ncols=True)
        try:
            while self.step < self.steps:
                if self.out_of_time(deadline):
                    stopped_by_time = True
                    break
                scalars, loads = self.train_step()
                meter.add(loads)
                tokens += scalars.pop("step_tokens")
                for key, value in scalars.items():
                    sums[key] = sums.get(key, 0.0) + value
                n_steps += 1
                bar.update(1)
                if self.step % run.log_every == 0 or self.step == self.steps:
                    seconds = time.perf_counter() - interval_start
                    last_train = self._log_train(sums, n_steps, meter, tokens, seconds, bar)
                    meter, sums, n_steps, tokens = LoadMeter(), {}, 0, 0
                    interval_start = time.perf_counter()
                if run.eval_every and self.step % run.eval_every == 0 and self.step < self.steps:
                    last_val = self._log_val(bar)
                    interval_start = time.perf_counter()
                if run.save_every and self.step % run.save_every == 0 and self.step < self.steps:
                    self.save()
                    interval_start = time.perf_counter()
            if n_steps:
                last_train = self._log_train(sums, n_steps, meter, tokens, time.perf_counter() - interval_start, bar)
        finally:
            bar.close()
        last_val = self._log_val(None) or last_val
        checkpoint = self.save()
        final = self.save_final()
        return SFTResult(self.run_dir, self.step, self.tokens, final, checkpoint, last_train, last_val, stopped_by_time)

    def _log_train(self, sums, n: int, meter: LoadMeter, tokens: int, seconds: float, bar) -> dict[str, Any]:
        record: dict[str, Any] = {"kind": "train", "step": self.step, "tokens": self.tokens}
        record.update({k: v / n for k, v in sums.items()})
        record["tokens_per_s"] = round(tokens / max(seconds, 1e-9), 1)
        record.update(meter.summary())
        self.log.write(record)
        text = f"loss {record['loss']:.4f}" + (f" kl {record['kl']:.4f}" if "kl" in record else "")
        text += f" lr {record['lr']:.1e} tok/s {record['tokens_per_s']:,.0f}"
        if bar is not None and not bar.disable:
            bar.set_postfix_str(text, refresh=False)
        else:
            self.echo(f"step {self.step}/{self.steps} {text}")
        return record

    def _log_val(self, bar) -> dict[str, Any]:
        metrics = self.evaluate()
        if not metrics:
            return {}
        record = {"kind": "val", "step": self.step, "tokens": self.tokens, **metrics}
        self.log.write(record)
        msg = f"step {self.step}: val loss {metrics['val_loss']:.4f}" + (
            f", val KL {metrics['val_kl']:.4f}" if "val_kl" in metrics else "")
        (bar.write if bar is not None and not bar.disable else self.echo)(msg)
        return record

    # ------------------------------------------------------------------ saving
    def save(self) -> Path:
        state = {"step": self.step, "tokens": self.tokens, "batches": self.batches.state_dict(),
                 "data_fingerprint": self.fingerprint, "threads": torch.get_num_threads()}
        return save_checkpoint(self.run_dir, self.model, self.optimizers, state, self.tokenizer, self.cfg.run.keep_last)

    def save_final(self) -> Path:
        """The fine-tuned model as a hub-layout directory `RUN/final` (with the tokenizer)."""
        final = self.run_dir / FINAL
        tmp = self.run_dir / f".tmp-{FINAL}"
        write_model_dir(self.model, self.tokenizer, tmp)
        publish_dir(tmp, final)
        return final


def sft(model: str | Path, data: str | Path, out: str | Path, *, overrides: list[str] | None = None,
        progress: bool | None = None) -> SFTResult:
    """Fine-tune the model in `model` on the JSONL `data` into run directory `out` (Python entry point
    of `seekformer sft`); `overrides` are `section.key=value` settings of SFTConfig."""
    cfg = SFTConfig()
    cfg.model.dir, cfg.data.train = str(model), str(data)
    cfg.apply_overrides(list(overrides or []))
    return SFTTrainer(cfg, out, progress=progress).train()
