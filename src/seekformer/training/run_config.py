"""Run configuration: one TOML file (or a built-in run preset) plus `--set section.key=value` overrides.

Sections: `[model]` (a model preset or config.json, then any ModelConfig field), `[data]`, `[optim]`,
`[schedule]`, `[balance]`, `[mtp]`, `[engram]`, `[run]`, `[parallel]` (how a torchrun job splits). Every
key is checked against the dataclasses below (or ModelConfig's fields for `[model]`): an unknown key or
a value of the wrong type is an error that names it. The resolved configuration is saved as JSON
(`run_config.json`) because TOML has no null, and several model fields (`q_lora_rank`, `n_group`, ...)
legitimately take None.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    import tomli as tomllib

from ..config import PRESETS, ConfigError, ModelConfig

SCHEDULES = ("cosine", "linear", "wsd", "constant")
DTYPES = ("bf16", "fp32", "fp8")
DEVICES = ("auto", "cpu", "cuda")
MOMENT_DTYPES = ("fp32", "bf16")


class RunConfigError(ValueError):
    """A run configuration key or value that is unknown or has the wrong type."""


@dataclass
class DataSection:
    dir: str = ""  # a prepared dataset (seekformer data prepare); "" = the default corpus, cached
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_batches: int = 20  # validation batches per evaluation (0 = the whole val split)


@dataclass
class OptimSection:
    lr: float = 3e-3  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine, wsd)
    weight_decay: float = 0.1  # on matrices only; norms and biases are not decayed
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    moment_dtype: str = "fp32"  # AdamW's exp_avg/exp_avg_sq: fp32, or bf16 as in DeepSeek-V3 (weights stay fp32)


@dataclass
class ScheduleSection:
    kind: str = "cosine"  # cosine | linear (decay to min_lr_ratio) | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # wsd: share of the steps spent in the final linear decay


@dataclass
class BalanceSection:
    bias_update_speed: float = 0.001  # gamma of the auxiliary-loss-free bias update (V3: 0.001)
    bias_update_until: float = 1.0  # share of the steps after which gamma is 0 (V3: ~0.97)
    seq_aux_alpha: float = 0.0001  # alpha of the sequence-wise balance loss (V3: 0.0001)
    aux_loss_alpha: float = 0.0  # alpha of the V2 expert-level auxiliary loss (for comparisons)


@dataclass
class MTPSection:
    depth: int = 1  # D, the number of MTP modules (sets the model's num_nextn_predict_layers)
    weight: float = 0.3  # lambda (V3: 0.3 for the first 10T of 14.8T tokens ...)
    weight_after: float = 0.1  # ... then 0.1
    switch_fraction: float = 0.7  # share of the steps after which lambda = weight_after


@dataclass
class EngramSection:
    """Training of the Engram tables (used when `[model] engram_layer_ids` is non-empty)."""

    lr_multiplier: float = 5.0  # tables: SparseAdam at optim.lr * this (Engram paper: 5x), no weight decay


@dataclass
class RunSection:
    steps: int = 1000  # optimizer steps (the schedule's length)
    max_minutes: float = 0.0  # stop at a step boundary after this much wall-clock time; 0 = no limit
    fit_to_time: bool = False  # at the end of warmup, set steps to what fits in max_minutes (see docs)
    seed: int = 0  # model init and data order
    dtype: str = "bf16"  # autocast compute dtype (weights and optimizer stay float32); fp8: V3's FP8 recipe
    device: str = "auto"  # auto = cuda when available, else cpu
    threads: int = 0  # CPU threads; 0 = torch's default, or 1 when other processes keep the cores busy
    activation_checkpointing: bool = False  # recompute each block's activations in the backward (less memory)
    log_every: int = 10
    eval_every: int = 100  # 0 = only at the end
    save_every: int = 200  # 0 = only at the end
    keep_last: int = 3  # checkpoints kept


@dataclass
class ParallelSection:
    dp_shard: int = 0  # data-parallel shards (FSDP2); 0 = world size / ep
    ep: int = 1  # expert-parallel ranks: each holds n_routed_experts / ep routed experts
    timeout_s: float = 300.0  # a collective waiting longer than this fails (a rank died) instead of hanging


SECTIONS: dict[str, type] = {
    "data": DataSection, "optim": OptimSection, "schedule": ScheduleSection,
    "balance": BalanceSection, "mtp": MTPSection, "engram": EngramSection, "run": RunSection,
    "parallel": ParallelSection,
}
BASE_KEYS = ("preset", "config", "init")  # init: a model directory whose weights the run continues from
_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra", "num_nextn_predict_layers"}


@dataclass
class RunConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny-v3"})
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    balance: BalanceSection = field(default_factory=BalanceSection)
    mtp: MTPSection = field(default_factory=MTPSection)
    engram: EngramSection = field(default_factory=EngramSection)
    run: RunSection = field(default_factory=RunSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "run config") -> RunConfig:
        cfg = cls()
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise RunConfigError(f"{source}: [{section}] must be a table of settings, got {values!r}")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value, source)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """A TOML run config, or the `run_config.json` a run directory holds."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"run config {path} not found")
        try:
            raw = json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
            raise RunConfigError(f"{path}: cannot parse ({exc})") from exc
        return cls.from_dict(raw, str(path))

    @classmethod
    def preset(cls, name: str) -> RunConfig:
        if name not in RUN_PRESETS:
            raise RunConfigError(f"unknown run preset {name!r}; available: {', '.join(RUN_PRESETS)}")
        return cls.from_dict(RUN_PRESETS[name], f"run preset {name!r}")

    @classmethod
    def from_spec(cls, spec: str) -> RunConfig:
        """What `seekformer train --config SPEC` names: a TOML file or a run's run_config.json; else a run
        preset; else a model preset, trained with the default settings (MTP depth from the preset, no
        auxiliary-loss-free bias without a biased router)."""
        if Path(spec).exists():
            return cls.load(spec)
        if spec in RUN_PRESETS:
            return cls.preset(spec)
        if spec in PRESETS:  # the default settings, less what the model cannot do (MTP, biased routers)
            model = PRESETS[spec]
            raw: dict[str, Any] = {"model": {"preset": spec},
                                   "mtp": {"depth": model.get("num_nextn_predict_layers") or 0}}
            if model.get("topk_method") != "noaux_tc":
                raw["balance"] = {"bias_update_speed": 0.0}
            return cls.from_dict(raw, f"model preset {spec!r}")
        raise RunConfigError(f"run config {spec!r} not found: give a .toml file, a run's run_config.json, a run "
                             f"preset ({', '.join(RUN_PRESETS)}) or a model preset ({', '.join(PRESETS)})")

    def set(self, key: str, value: Any, source: str = "--set") -> None:
        """Set `section.name` to `value` after checking that the key exists and the type fits."""
        section, _, name = key.partition(".")
        if not name:
            raise RunConfigError(f"{source}: setting {key!r} must be section.key; sections: model, "
                                 f"{', '.join(SECTIONS)}")
        if section == "model":
            value = _check_model_value(name, value, source)
            if name in BASE_KEYS:  # the base model: one of them, the last one set wins
                for other in BASE_KEYS:
                    if other != name:
                        self.model.pop(other, None)
            self.model[name] = value
            return
        if section not in SECTIONS:
            raise RunConfigError(f"{source}: unknown section [{section}] in {key!r}; "
                                 f"known: model, {', '.join(SECTIONS)}")
        target = getattr(self, section)
        hints = typing.get_type_hints(type(target))
        if name not in hints:
            raise RunConfigError(f"{source}: unknown setting {key!r}; [{section}] has: {', '.join(hints)}")
        setattr(target, name, _coerce(value, hints[name], f"{source}: {key}"))

    def apply_overrides(self, items: list[str]) -> None:
        """Apply `section.key=value` strings; a value is read as a TOML literal, else as a plain string."""
        for item in items:
            key, sep, text = item.partition("=")
            if not sep:
                raise RunConfigError(f"--set {item!r}: expected section.key=value")
            self.set(key.strip(), parse_value(text.strip()), f"--set {key.strip()}")
        self.validate()

    # ------------------------------------------------------------------ checks and views
    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise RunConfigError(f"invalid run config: {msg}")

        d, o, s, b, m, r = self.data, self.optim, self.schedule, self.balance, self.mtp, self.run
        need(d.seq_len >= 1 and d.batch_size >= 1 and d.grad_accum >= 1,
             f"data.seq_len, data.batch_size and data.grad_accum must be >= 1, got {d.seq_len}, "
             f"{d.batch_size}, {d.grad_accum}")
        need(d.eval_batches >= 0, f"data.eval_batches must be >= 0, got {d.eval_batches}")
        need(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
        need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
        need(o.weight_decay >= 0 and o.grad_clip >= 0 and o.eps > 0,
             "optim.weight_decay and optim.grad_clip must be >= 0, optim.eps > 0")
        need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim.beta1/beta2 must be in [0, 1), got {o.beta1}, {o.beta2}")
        need(o.moment_dtype in MOMENT_DTYPES,
             f"optim.moment_dtype must be one of {', '.join(MOMENT_DTYPES)}, got {o.moment_dtype!r}")
        need(s.kind in SCHEDULES, f"schedule.kind must be one of {', '.join(SCHEDULES)}, got {s.kind!r}")
        need(s.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}")
        need(0 <= s.decay_fraction <= 1, f"schedule.decay_fraction must be in [0, 1], got {s.decay_fraction}")
        need(b.bias_update_speed >= 0 and b.seq_aux_alpha >= 0 and b.aux_loss_alpha >= 0,
             "balance.bias_update_speed, seq_aux_alpha and aux_loss_alpha must be >= 0")
        need(0 <= b.bias_update_until <= 1, f"balance.bias_update_until must be in [0, 1], got {b.bias_update_until}")
        need(m.depth >= 0 and m.weight >= 0 and m.weight_after >= 0, "mtp.depth, weight, weight_after must be >= 0")
        need(0 <= m.switch_fraction <= 1, f"mtp.switch_fraction must be in [0, 1], got {m.switch_fraction}")
        need(self.engram.lr_multiplier > 0, f"engram.lr_multiplier must be > 0, got {self.engram.lr_multiplier}")
        need(r.steps >= 1, f"run.steps must be >= 1, got {r.steps}")
        need(r.max_minutes >= 0, f"run.max_minutes must be >= 0, got {r.max_minutes}")
        need(r.dtype in DTYPES, f"run.dtype must be one of {', '.join(DTYPES)}, got {r.dtype!r}")
        need(r.device in DEVICES, f"run.device must be one of {', '.join(DEVICES)}, got {r.device!r}")
        p = self.parallel
        need(p.ep >= 1 and p.dp_shard >= 0 and p.timeout_s > 0,
             f"parallel.ep must be >= 1, parallel.dp_shard >= 0 (0 = automatic), parallel.timeout_s > 0; got "
             f"{p.ep}, {p.dp_shard}, {p.timeout_s}")
        need(r.threads >= 0, f"run.threads must be >= 0 (0 = automatic), got {r.threads}")
        need(r.log_every >= 1 and r.eval_every >= 0 and r.save_every >= 0 and r.keep_last >= 1,
             "run.log_every and run.keep_last must be >= 1, run.eval_every and run.save_every >= 0")
        try:
            self.model_config()  # the model's own checks, before any data is prepared
        except ConfigError as exc:
            raise RunConfigError(f"invalid run config: [model] {exc}") from None

    def model_config(self, vocab_size: int | None = None, special_ids: dict[str, int] | None = None) -> ModelConfig:
        """The ModelConfig: preset or config.json, then the `[model]` fields, MTP depth, and, unless
        `[model]` sets them, the dataset's vocabulary size and special token ids. With `init` (a model
        directory to continue from) its config.json is the base, and its vocabulary is kept."""
        fields = {k: v for k, v in self.model.items() if k not in BASE_KEYS}
        if vocab_size is not None and "init" not in self.model:
            fields.setdefault("vocab_size", vocab_size)
        for key, value in (special_ids or {}).items():
            fields.setdefault(key, value)
        fields["num_nextn_predict_layers"] = self.mtp.depth
        if "config" in self.model or "init" in self.model:
            base = ModelConfig.from_hf(self.model.get("config") or self.model["init"]).to_hf()
        else:
            base = dict(PRESETS[self.model["preset"]])
        if "num_attention_heads" in fields and base.get("num_key_value_heads") == base.get("num_attention_heads"):
            fields.setdefault("num_key_value_heads", fields["num_attention_heads"])  # MHA/MLA: they go together
        config = ModelConfig.from_hf({**base, **fields})
        if vocab_size is not None and config.vocab_size < vocab_size:
            raise RunConfigError(f"model.vocab_size {config.vocab_size} is smaller than the dataset's "
                                 f"vocabulary ({vocab_size} ids)")
        return config

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": dict(self.model)}
        out.update({name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS})
        return out

    def save(self, path: str | Path) -> Path:
        from ..io_utils import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @property
    def tokens_per_step(self) -> int:
        return self.data.seq_len * self.data.batch_size * self.data.grad_accum


def parse_value(text: str) -> Any:
    """A `--set` value: a TOML literal (1e-3, true, [1, 2], "x"), `none`/`null` for None, else the string."""
    if text.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _check_model_value(name: str, value: Any, source: str) -> Any:
    if name == "num_nextn_predict_layers":
        raise RunConfigError(f"{source}: set the number of MTP modules with mtp.depth, not model.{name}")
    if name == "preset":
        if value not in PRESETS:
            raise RunConfigError(f"{source}: unknown model preset {value!r}; available: {', '.join(PRESETS)}")
        return value
    if name in ("config", "init"):
        return _coerce(value, str, f"{source}: model.{name}")
    if name not in _MODEL_FIELDS:
        raise RunConfigError(f"{source}: unknown model setting {name!r}; [model] takes preset, config or init and "
                             f"ModelConfig fields (e.g. hidden_size, n_routed_experts, num_experts_per_tok)")
    return _coerce(value, typing.get_type_hints(ModelConfig)[name], f"{source}: model.{name}")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` if it fits the type hint (ints are accepted for floats), else a RunConfigError."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, where)
            except RunConfigError:
                continue
        raise RunConfigError(f"{where}: expected {_name(hint)}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if isinstance(value, list):
            return [_coerce(v, item, where) for v in value]
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise RunConfigError(f"{where}: expected {_name(hint)}, got {value!r}")


def _name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "none"
    return getattr(hint, "__name__", str(hint))


# Built-in run configs (`seekformer train --config NAME`). "demo" is what `seekformer demo` trains.
RUN_PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "model": {"preset": "tiny-v3"},
        # at a fixed token budget, 8 sequences per step learned faster than 16 (docs/benchmarks.md)
        "data": {"seq_len": 256, "batch_size": 8, "eval_batches": 16},
        "schedule": {"warmup_steps": 30},
        # a few hundred steps at a high learning rate: with V3's gamma of 0.001 the early routing
        # collapse takes most of the run to undo (docs/benchmarks.md, balancing ablation); 0.01 is faster
        "balance": {"bias_update_speed": 0.01},
        "run": {"steps": 400, "log_every": 5, "eval_every": 100, "save_every": 100, "fit_to_time": True},
    },
}
