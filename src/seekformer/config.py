"""ModelConfig: one dataclass for every DeepSeek generation, in the hub's own field names.

`ModelConfig.from_hf` reads a Hugging Face `config.json` (DeepSeek-V3, V2/V2-Lite, DeepSeekMoE and
the Llama-architecture DeepSeek LLM); `to_hf` writes one back. Fields missing from a file take the
defaults of *that* model type (the hub's defaults differ between V2 and V3), and fields seekformer
does not use are kept in `extra` so a round trip loses nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "deepseek", "llama")
ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek": "DeepseekForCausalLM",
    "llama": "LlamaForCausalLM",
}
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
ROPE_TYPES = ("default", "yarn")


class ConfigError(ValueError):
    """A model configuration that cannot describe a valid model."""


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    # --- shared by every generation
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None
    head_dim: int | None = None  # llama only; None = hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    # --- mixture of experts (DeepSeekMoE, V2, V3); n_routed_experts None means a dense model
    moe_intermediate_size: int = 2048
    n_shared_experts: int | None = 1
    n_routed_experts: int | None = 256
    num_experts_per_tok: int | None = 8
    routed_scaling_factor: float = 2.5
    n_group: int | None = 8
    topk_group: int | None = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    ep_size: int = 1
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    # --- Multi-head Latent Attention (V2, V3)
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    rope_interleave: bool = True
    # --- V3 extras
    num_nextn_predict_layers: int = 0
    quantization_config: dict[str, Any] | None = None
    # --- Engram conditional memory (empty engram_layer_ids = off)
    engram_layer_ids: list[int] = field(default_factory=list)
    engram_max_ngram: int = 3
    engram_heads: int = 8
    engram_dim_per_ngram: int = 512
    engram_table_size: list[int] | None = None  # one per n-gram order 2..N; None = 5 * vocab_size
    engram_kernel: int = 4
    engram_seed: int = 0
    engram_pad_id: int | None = None  # raw token id; None = pad_token_id, else eos
    # --- unknown hub fields, kept for the round trip
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def is_mla(self) -> bool:
        return self.model_type in ("deepseek_v3", "deepseek_v2")

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts) and self.model_type != "llama"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def attn_head_dim(self) -> int:
        """Head dim of MHA/GQA models (DeepSeek LLM, DeepSeekMoE)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.attn_head_dim

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def uses_pairwise_rope(self) -> bool:
        """V2 always rotates adjacent pairs (complex form); V3 when `rope_interleave`; MHA models never."""
        if self.model_type == "deepseek_v2":
            return True
        return self.model_type == "deepseek_v3" and self.rope_interleave

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.is_moe
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def engram_pad_token(self) -> int:
        for candidate in (self.engram_pad_id, self.pad_token_id, self.eos_token_id):
            if isinstance(candidate, list):
                candidate = candidate[0] if candidate else None
            if candidate is not None:
                return candidate
        return 0

    @property
    def engram_table_sizes(self) -> list[int]:
        if self.engram_table_size is not None:
            return list(self.engram_table_size)
        return [5 * self.vocab_size] * (self.engram_max_ngram - 1)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(f"invalid {self.model_type} config: {msg}")

        if self.model_type not in MODEL_TYPES:
            raise ConfigError(
                f"unknown model_type {self.model_type!r}; supported: {', '.join(MODEL_TYPES)}"
            )
        self._validate_field_types(fail)  # every later check may rely on the types and ranges
        if self.hidden_act != "silu":
            fail(f"hidden_act {self.hidden_act!r} is not supported (DeepSeek models use 'silu')")
        if self.num_attention_heads % self.num_key_value_heads:
            fail(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                 f"num_key_value_heads ({self.num_key_value_heads})")
        if not self.is_mla and self.head_dim is None and self.hidden_size % self.num_attention_heads:
            fail(f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                 f"({self.num_attention_heads}); set head_dim")
        if self.rope_dim % 2:
            what = "qk_rope_head_dim" if self.is_mla else "head_dim"
            layout = "interleaved " if self.uses_pairwise_rope else ""
            fail(f"{what} must be even for {layout}RoPE, got {self.rope_dim}")
        if self.rope_scaling is not None:
            self._validate_rope_scaling(fail)
        if self.is_moe:
            self._validate_moe(fail)
        if self.first_k_dense_replace > self.num_hidden_layers:
            fail(f"first_k_dense_replace ({self.first_k_dense_replace}) must be in "
                 f"[0, num_hidden_layers={self.num_hidden_layers}]")
        if self.num_nextn_predict_layers and self.model_type != "deepseek_v3":
            fail("num_nextn_predict_layers (Multi-Token Prediction) needs model_type deepseek_v3")
        if self.quantization_config is not None:
            try:
                fp8_block_size(self.quantization_config)
            except ConfigError as exc:
                fail(str(exc))
        if self.engram_layer_ids:
            self._validate_engram(fail)

    def _validate_field_types(self, fail) -> None:
        """The type and range of every field on its own (the table `_FIELD_RULES`)."""
        for name, rule in _FIELD_RULES.items():
            value = getattr(self, name)
            if not rule.accepts(value):
                fail(f"{name} must be {rule.describe()}, got {value!r}")
        eos = self.eos_token_id
        if not (_TOKEN.accepts(eos) or isinstance(eos, list) and eos and all(_is_int(t) and t >= 0 for t in eos)):
            fail(f"eos_token_id must be an integer >= 0, a non-empty list of them or null, got {eos!r}")
        for name in ("engram_layer_ids", "engram_table_size"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, list) and all(_is_int(v) for v in value)):
                fail(f"{name} must be a list of integers, got {value!r}")
        if not isinstance(self.extra, dict):
            fail(f"extra must be a dict, got {self.extra!r}")

    def _validate_rope_scaling(self, fail) -> None:
        rs = self.rope_scaling
        if not isinstance(rs, dict):
            fail(f"rope_scaling must be an object or null, got {rs!r}")
        if not isinstance(self.rope_type, str) or self.rope_type not in ROPE_TYPES:
            fail(f"unknown rope type {self.rope_type!r} in rope_scaling; supported: {', '.join(ROPE_TYPES)}")
        if self.rope_type != "yarn":
            return
        factor = rs.get("factor")
        if not _is_number(factor) or factor < 1:
            fail(f"rope_scaling.factor must be a number >= 1 for yarn, got {factor!r}")
        for key, rule in _YARN_RULES.items():
            value = rs.get(key)
            if value is not None and not rule.accepts(value):
                fail(f"rope_scaling.{key} must be {rule.describe()} or null, got {value!r}")

    def _validate_moe(self, fail) -> None:
        n, k = self.n_routed_experts, self.num_experts_per_tok
        if k is None or not 1 <= k <= n:
            fail(f"num_experts_per_tok must be in [1, n_routed_experts={n}], got {k!r}")
        if self.topk_method not in TOPK_METHODS:
            fail(f"unknown topk_method {self.topk_method!r}; supported: {', '.join(TOPK_METHODS)}")
        if self.scoring_func not in SCORING_FUNCS:
            fail(f"unknown scoring_func {self.scoring_func!r}; supported: {', '.join(SCORING_FUNCS)}")
        if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
            fail("topk_method 'noaux_tc' needs scoring_func 'sigmoid'")
        if self.uses_groups:
            g, tg = self.n_group, self.topk_group
            if n % g:
                fail(f"n_routed_experts ({n}) must be divisible by n_group ({g})")
            if tg is None or not 1 <= tg <= g:
                fail(f"topk_group must be in [1, n_group={g}], got {tg!r}")
            if k > tg * (n // g):
                fail(f"num_experts_per_tok ({k}) exceeds the {tg * (n // g)} experts in "
                     f"topk_group={tg} groups of {n // g}")
            if self.topk_method == "noaux_tc" and n // g < 2:
                fail(f"noaux_tc scores a group by its top-2 experts, so each group needs >= 2 "
                     f"experts; got n_routed_experts/n_group = {n // g}")

    def _validate_engram(self, fail) -> None:
        ids = self.engram_layer_ids
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < self.num_hidden_layers]
        if bad:
            fail(f"engram_layer_ids {bad} out of range [0, {self.num_hidden_layers})")
        if len(set(ids)) != len(ids):
            fail(f"engram_layer_ids has duplicates: {ids}")
        if self.engram_pad_token >= self.vocab_size:  # bos/eos/pad ids beyond a vocabulary are harmless elsewhere
            fail(f"Engram's pad id {self.engram_pad_token} (engram_pad_id, else pad_token_id, else eos_token_id) "
                 f"is not a token id of the vocabulary (vocab_size {self.vocab_size})")
        if self.engram_dim_per_ngram % self.engram_heads:
            fail(f"engram_dim_per_ngram ({self.engram_dim_per_ngram}) must be divisible by "
                 f"engram_heads ({self.engram_heads})")
        sizes = self.engram_table_sizes
        if len(sizes) != self.engram_max_ngram - 1 or any(s < 2 for s in sizes):
            fail(f"engram_table_size needs {self.engram_max_ngram - 1} sizes >= 2 "
                 f"(orders 2..{self.engram_max_ngram}), got {sizes}")

    @property
    def uses_groups(self) -> bool:
        return self.topk_method in ("group_limited_greedy", "noaux_tc") and (self.n_group or 1) > 1

    # ------------------------------------------------------------------ hub config.json
    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> ModelConfig:
        """Read a hub `config.json` (a dict, the file, or the directory holding it)."""
        if isinstance(source, dict):
            raw = copy.deepcopy(source)
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no config.json at {path}")
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
            if not isinstance(raw, dict):
                raise ConfigError(f"{path} must hold a JSON object, got {type(raw).__name__}")
        model_type = raw.pop("model_type", None)
        if model_type not in MODEL_TYPES:
            raise ConfigError(
                f"unknown model_type {model_type!r}; supported: {', '.join(MODEL_TYPES)}"
            )
        values: dict[str, Any] = dict(_TYPE_DEFAULTS[model_type])
        rope_parameters = raw.pop("rope_parameters", None)
        if rope_parameters is not None and not isinstance(rope_parameters, dict):
            raise ConfigError(f"rope_parameters must be an object, got {rope_parameters!r}")
        if rope_parameters:
            rope = dict(rope_parameters)
            values["rope_theta"] = rope.pop("rope_theta", values.get("rope_theta", 10000.0))
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                values["rope_scaling"] = rope
        if "num_mtp_layers" in raw:  # transformers' alias
            raw.setdefault("num_nextn_predict_layers", raw.pop("num_mtp_layers"))
        for derived in ("qk_head_dim", "architectures", "transformers_version"):
            raw.pop(derived, None)  # written anew by to_hf
        if model_type in ("deepseek_v3", "deepseek_v2"):
            raw.pop("head_dim", None)  # transformers stores qk_rope_head_dim here; derived
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "model_type"}
        extra = {}
        for key, value in raw.items():
            if key in known:
                values[key] = value
            else:
                extra[key] = value
        scaling = values.get("rope_scaling")
        if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            values["rope_scaling"] = None
        return cls(model_type=model_type, extra=extra, **values)

    def to_hf(self) -> dict[str, Any]:
        """The hub `config.json` dict for this model type (loadable by transformers for V2/V3/llama)."""
        out: dict[str, Any] = {"architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type}
        for name in _HF_FIELDS[self.model_type]:
            out[name] = copy.deepcopy(getattr(self, name))
        if self.engram_layer_ids:
            for f in dataclasses.fields(self):
                if f.name.startswith("engram_"):
                    out[f.name] = copy.deepcopy(getattr(self, f.name))
        if self.quantization_config is not None:  # any model type can hold FP8 weights
            out["quantization_config"] = copy.deepcopy(self.quantization_config)
        out.update(copy.deepcopy(self.extra))
        return out

    def save(self, directory: str | Path) -> Path:
        from .io_utils import atomic_write_text

        path = Path(directory) / "config.json"
        atomic_write_text(path, json.dumps(self.to_hf(), indent=2, sort_keys=True) + "\n")
        return path

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        raw = dict(PRESETS[name])
        raw.update(overrides)
        return cls.from_hf(raw)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def yarn_mscale_all_dim(self) -> float:
        """Factor applied (squared) to the softmax scale under YaRN, as DeepSeek's code does."""
        if self.rope_type != "yarn":
            return 1.0
        mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0) or 0
        return yarn_get_mscale(self.rope_scaling["factor"], mscale_all_dim) if mscale_all_dim else 1.0


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def fp8_block_size(quantization_config: Any) -> tuple[int, int] | None:
    """The one validator of a `quantization_config`: None when there is none, else the (rows, cols)
    weight block of DeepSeek-V3's block-wise FP8 (a missing `weight_block_size` means [128, 128],
    as in transformers). Anything else is a `ConfigError` naming the key and its value."""
    qc = quantization_config
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ConfigError(f"quantization_config must be an object or null, got {qc!r}")
    method = qc.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"quantization_config.quant_method {method!r} is not supported "
                          "(only the hub's block-wise 'fp8')")
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"quantization_config.fmt {fmt!r} is not supported (DeepSeek-V3's FP8 weights are 'e4m3')")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ConfigError(f"quantization_config.activation_scheme {scheme!r} is not supported (only 'dynamic')")
    block = qc.get("weight_block_size", [128, 128])
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(_is_int(b) and b > 0 for b in block)):
        hint = " (per-tensor FP8 is not supported)" if block is None else ""
        raise ConfigError(f"quantization_config.weight_block_size must be two positive integers, got {block!r}{hint}")
    return block[0], block[1]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class _Rule:
    """What one config value may be: its kind, an optional lower (and upper) bound, whether null is allowed."""

    kind: str  # "int", "number", "bool" or "str"
    low: float | None = None
    low_open: bool = False  # `low` itself excluded
    below: float | None = None  # values must be smaller than this
    nullable: bool = False

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.kind in ("bool", "str"):
            return isinstance(value, bool if self.kind == "bool" else str)
        if not (_is_int(value) if self.kind == "int" else _is_number(value)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.below is None or value < self.below

    def describe(self) -> str:
        text = {"int": "an integer", "number": "a finite number", "bool": "true or false", "str": "a string"}[self.kind]
        if self.low is not None:
            text += f" {'>' if self.low_open else '>='} {self.low:g}"
        if self.below is not None:
            text += f" and < {self.below:g}"
        return text + (" or null" if self.nullable else "")


_COUNT, _SIZE = _Rule("int", 0), _Rule("int", 1)
_OPTIONAL_SIZE, _TOKEN = _Rule("int", 1, nullable=True), _Rule("int", 0, nullable=True)
_POSITIVE, _FLAG, _NAME = _Rule("number", 0, low_open=True), _Rule("bool"), _Rule("str")
# Every scalar field of ModelConfig (lists, dicts and eos_token_id are checked on their own).
_FIELD_RULES: dict[str, _Rule] = {
    "vocab_size": _SIZE, "hidden_size": _SIZE, "intermediate_size": _SIZE, "num_hidden_layers": _SIZE,
    "num_attention_heads": _SIZE, "num_key_value_heads": _SIZE, "head_dim": _OPTIONAL_SIZE, "hidden_act": _NAME,
    "max_position_embeddings": _SIZE, "initializer_range": _Rule("number", 0), "rms_norm_eps": _POSITIVE,
    "use_cache": _FLAG, "pad_token_id": _TOKEN, "bos_token_id": _TOKEN, "pretraining_tp": _SIZE,
    "tie_word_embeddings": _FLAG, "rope_theta": _POSITIVE, "attention_bias": _FLAG,
    "attention_dropout": _Rule("number", 0, below=1), "mlp_bias": _FLAG,
    "moe_intermediate_size": _SIZE, "n_shared_experts": _Rule("int", 0, nullable=True),
    "n_routed_experts": _OPTIONAL_SIZE, "num_experts_per_tok": _OPTIONAL_SIZE, "routed_scaling_factor": _POSITIVE,
    "n_group": _OPTIONAL_SIZE, "topk_group": _OPTIONAL_SIZE, "topk_method": _NAME, "scoring_func": _NAME,
    "norm_topk_prob": _FLAG, "first_k_dense_replace": _COUNT, "moe_layer_freq": _SIZE, "ep_size": _SIZE,
    "aux_loss_alpha": _Rule("number", 0), "seq_aux": _FLAG,
    "kv_lora_rank": _SIZE, "q_lora_rank": _OPTIONAL_SIZE, "qk_rope_head_dim": _SIZE, "qk_nope_head_dim": _SIZE,
    "v_head_dim": _SIZE, "rope_interleave": _FLAG, "num_nextn_predict_layers": _COUNT,
    "engram_max_ngram": _Rule("int", 2), "engram_heads": _SIZE, "engram_dim_per_ngram": _SIZE,
    "engram_kernel": _SIZE, "engram_seed": _COUNT, "engram_pad_id": _TOKEN,
}
_YARN_RULES: dict[str, _Rule] = {
    "original_max_position_embeddings": _SIZE, "beta_fast": _POSITIVE, "beta_slow": _POSITIVE,
    "mscale": _Rule("number", 0), "mscale_all_dim": _Rule("number", 0), "attention_factor": _POSITIVE,
    "truncate": _FLAG,
}

_COMMON = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
           "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "pretraining_tp",
           "tie_word_embeddings", "rope_theta", "rope_scaling", "attention_bias", "attention_dropout"]
_MOE = ["moe_intermediate_size", "n_shared_experts", "n_routed_experts", "num_experts_per_tok",
        "first_k_dense_replace", "moe_layer_freq", "norm_topk_prob", "scoring_func", "aux_loss_alpha",
        "seq_aux"]
_MLA = ["kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"]
_HF_FIELDS = {
    "deepseek_v3": _COMMON + _MOE + _MLA + ["routed_scaling_factor", "n_group", "topk_group", "topk_method",
                                            "ep_size", "rope_interleave", "num_nextn_predict_layers"],
    "deepseek_v2": _COMMON + _MOE + _MLA + ["routed_scaling_factor", "n_group", "topk_group", "topk_method",
                                            "ep_size", "mlp_bias"],
    "deepseek": _COMMON + _MOE,
    "llama": _COMMON + ["head_dim", "mlp_bias"],
}

# Defaults of each model type's hub config class, used for fields a config.json leaves out.
_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {},  # the dataclass defaults are DeepSeek-V3's
    "deepseek_v2": dict(
        vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
        moe_intermediate_size=1407, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=None,
        routed_scaling_factor=1.0, n_group=None, topk_group=None, topk_method="greedy",
        scoring_func="softmax", norm_topk_prob=False, first_k_dense_replace=0, q_lora_rank=1536,
        rope_interleave=True, quantization_config=None,
    ),
    "deepseek": dict(
        vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
        num_attention_heads=32, max_position_embeddings=2048, bos_token_id=100000, eos_token_id=100001,
        moe_intermediate_size=1407, n_shared_experts=None, n_routed_experts=None, num_experts_per_tok=None,
        routed_scaling_factor=1.0, n_group=None, topk_group=None, topk_method="greedy",
        scoring_func="softmax", norm_topk_prob=False, first_k_dense_replace=0, rope_interleave=False,
    ),
    "llama": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
        n_shared_experts=None, n_routed_experts=None, num_experts_per_tok=None, n_group=None,
        topk_group=None, topk_method="greedy", scoring_func="softmax", first_k_dense_replace=0,
        rope_interleave=False,
    ),
}

_V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, dict[str, Any]] = {
    # ---- real shapes (build on the meta device for `seekformer info`)
    "deepseek-v3": dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512,
        q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
        topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True,
        max_position_embeddings=163840, rope_theta=10000, rope_scaling=_V3_YARN, bos_token_id=0,
        eos_token_id=1, num_nextn_predict_layers=1, scoring_func="sigmoid", topk_method="noaux_tc",
        quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                             "weight_block_size": [128, 128]},
    ),
    "deepseek-v2": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
        moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128,
        n_shared_experts=2, n_routed_experts=160, routed_scaling_factor=16.0, kv_lora_rank=512,
        q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
        topk_group=3, num_experts_per_tok=6, first_k_dense_replace=1, norm_topk_prob=False,
        topk_method="group_limited_greedy", scoring_func="softmax", max_position_embeddings=163840,
        rope_scaling={**_V3_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}, bos_token_id=100000,
        eos_token_id=100001,
    ),
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, routed_scaling_factor=1.0, kv_lora_rank=512,
        q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=1,
        topk_group=1, num_experts_per_tok=6, first_k_dense_replace=1, norm_topk_prob=False,
        topk_method="greedy", scoring_func="softmax", max_position_embeddings=163840,
        rope_scaling={**_V3_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}, bos_token_id=100000,
        eos_token_id=100001,
    ),
    "deepseek-moe-16b": dict(
        model_type="deepseek", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1,
        moe_layer_freq=1, norm_topk_prob=False, scoring_func="softmax", topk_method="greedy",
        max_position_embeddings=4096, bos_token_id=100000, eos_token_id=100001,
    ),
    "deepseek-llm-7b": dict(
        model_type="llama", vocab_size=102400, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32,
        max_position_embeddings=4096, bos_token_id=100000, eos_token_id=100001,
    ),
    "deepseek-llm-67b": dict(
        model_type="llama", vocab_size=102400, hidden_size=8192, intermediate_size=22016,
        num_hidden_layers=95, num_attention_heads=64, num_key_value_heads=8,
        max_position_embeddings=4096, bos_token_id=100000, eos_token_id=100001,
    ),
    # ---- tiny variants for tests and the demo
    "tiny-v3": dict(
        model_type="deepseek_v3", vocab_size=1024, hidden_size=128, intermediate_size=384,
        moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=16, routed_scaling_factor=2.5, kv_lora_rank=64,
        q_lora_rank=96, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32, n_group=4,
        topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1, norm_topk_prob=True,
        max_position_embeddings=1024, bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=1,
        scoring_func="sigmoid", topk_method="noaux_tc",
    ),
    "tiny-v2": dict(
        model_type="deepseek_v2", vocab_size=1024, hidden_size=128, intermediate_size=384,
        moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=2, n_routed_experts=16, routed_scaling_factor=1.0, kv_lora_rank=64,
        q_lora_rank=None, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32, n_group=4,
        topk_group=2, num_experts_per_tok=4, first_k_dense_replace=1, norm_topk_prob=False,
        topk_method="group_limited_greedy", scoring_func="softmax", max_position_embeddings=1024,
        bos_token_id=0, eos_token_id=1,
    ),
    "tiny-moe": dict(
        model_type="deepseek", vocab_size=1024, hidden_size=128, intermediate_size=384,
        moe_intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=2, n_routed_experts=16, num_experts_per_tok=4, first_k_dense_replace=1,
        norm_topk_prob=False, scoring_func="softmax", topk_method="greedy", max_position_embeddings=1024,
        bos_token_id=0, eos_token_id=1,
    ),
    "tiny-llm": dict(
        model_type="llama", vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=0,
        eos_token_id=1,
    ),
}
