"""MoGEConfig: the Pangu Pro MoE config.json, validated, with derived sizes and presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moge_cli.errors import ConfigError
from moge_cli.files import read_json

MODEL_TYPE = "PanguProMoE"

# Keys that must be present in config.json, with the type each must have.
_REQUIRED: dict[str, type] = {
    "vocab_size": int,
    "hidden_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "num_key_value_heads": int,
    "moe_intermediate_size": int,
    "shared_expert_intermediate_size": int,
    "num_experts": int,
    "num_experts_per_tok": int,
}


@dataclass
class MoGEConfig:
    """Pangu Pro MoE / MoGE architecture, field names as in config.json.

    Derived once in __post_init__: head_dim, n_groups, experts_per_group, picks_per_group,
    moe_layers, dense_layers, rope.
    num_experts 0 makes every layer a dense MLP of width intermediate_size, and
    shared_expert_intermediate_size 0 leaves the MoE layers without a shared expert (as Huawei's code runs them).
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    num_expert_groups: int | None = None  # moge extension; default num_experts_per_tok
    intermediate_size: int | None = None  # width of dense (mlp_only) layers
    mlp_only_layers: list[int] = field(default_factory=list)
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 16000000.0
    tie_word_embeddings: bool = False  # True: lm_head is the embedding matrix (no lm_head.weight needed)
    rope_scaling: dict[str, Any] | None = None  # Hugging Face's: linear, dynamic (NTK) or yarn; see `rope`
    torch_dtype: str = "bfloat16"
    model_type: str = MODEL_TYPE
    architectures: list[str] = field(default_factory=lambda: ["PanguProMoEForCausalLM"])
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept verbatim

    def __post_init__(self) -> None:
        _check_types(self)
        _check_counts(self)
        if self.num_expert_groups is None:
            self.num_expert_groups = self.num_experts_per_tok
        if self.num_experts:
            _check_groups(self)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config.json: hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) is not divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"config.json: mlp_only_layers names layers {bad} outside 0..{self.num_hidden_layers - 1}")
        if self.dense_layers and (self.intermediate_size is None or self.intermediate_size <= 0):
            why = "num_experts is 0 (every layer a dense MLP)" if not self.num_experts else "mlp_only_layers is set"
            raise ConfigError(f"config.json: {why}, so intermediate_size (dense MLP width) is required")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("config.json: rms_norm_eps and rope_theta must be positive")
        self.rope  # validates rope_scaling

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def n_groups(self) -> int:
        return int(self.num_expert_groups) if self.num_experts else 0

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.n_groups if self.num_experts else 0

    @property
    def picks_per_group(self) -> int:
        return self.num_experts_per_tok // self.n_groups if self.num_experts else 0

    @property
    def dense_layers(self) -> list[int]:
        """Layers with one dense MLP: mlp_only_layers, or every layer of a model without experts."""
        return list(range(self.num_hidden_layers)) if not self.num_experts else sorted(set(self.mlp_only_layers))

    @property
    def moe_layers(self) -> list[int]:
        dense = set(self.dense_layers)
        return [i for i in range(self.num_hidden_layers) if i not in dense]

    def is_dense(self, layer: int) -> bool:
        return not self.num_experts or layer in self.mlp_only_layers

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert_intermediate_size > 0

    @property
    def rope(self) -> RopeScaling | None:
        """rope_scaling parsed and checked (None: plain RoPE)."""
        return parse_rope_scaling(self.rope_scaling, self.max_position_embeddings)

    # ---- (de)serialisation ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoGEConfig":
        """Build from a config.json dict; unknown keys go to `extra`, missing required keys raise."""
        if not isinstance(d, dict):
            raise ConfigError("config.json: expected a JSON object at top level")
        _refuse_other_families(d)
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"config.json: missing required key(s) {', '.join(missing)}")
        d = _with_rope_parameters(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        if known.get("mlp_only_layers") is None:
            known.pop("mlp_only_layers", None)
        return cls(**known, extra=extra)

    @classmethod
    def from_file(cls, path: str | Path) -> "MoGEConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found; a checkpoint needs its config.json beside the weights")
        d = read_json(path, error=ConfigError)  # deep nesting, huge numbers, BOMs: a ConfigError naming the file
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_name(cls, name: str) -> "MoGEConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls.from_dict(PRESETS[name])

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict (unknown keys restored, group count only if it differs from the default)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for key in ("intermediate_size", "rope_scaling"):
            if d[key] is None:
                del d[key]
        if d["num_expert_groups"] == d["num_experts_per_tok"] and "num_expert_groups" not in self.extra:
            del d["num_expert_groups"]
        d.update(self.extra)
        return dict(sorted(d.items()))


def _check_counts(cfg: MoGEConfig) -> None:
    """Positive sizes; 0 allowed for num_experts (a dense model, whose routing keys then do not matter)
    and for shared_expert_intermediate_size (no shared expert)."""
    may_be_zero = {"shared_expert_intermediate_size", "num_experts"}
    if not cfg.num_experts:
        may_be_zero |= {"moe_intermediate_size", "num_experts_per_tok"}
    for key in _REQUIRED:
        v = getattr(cfg, key)
        if v < 0 or (v == 0 and key not in may_be_zero):
            raise ConfigError(f"config.json: {key} must be a positive integer, got {v}")
    if cfg.num_experts and cfg.moe_layers and (cfg.moe_intermediate_size <= 0 or cfg.num_experts_per_tok <= 0):
        raise ConfigError("config.json: moe_intermediate_size and num_experts_per_tok must be positive in a model with experts")


def _check_groups(cfg: MoGEConfig) -> None:
    g = cfg.num_expert_groups
    if g <= 0:
        raise ConfigError(f"config.json: num_expert_groups must be a positive integer, got {g}")
    if cfg.num_experts % g:
        raise ConfigError(
            f"config.json: num_experts ({cfg.num_experts}) is not divisible by the number of expert "
            f"groups ({g}); set num_expert_groups to a divisor of both num_experts and num_experts_per_tok"
        )
    if cfg.num_experts_per_tok % g:
        raise ConfigError(
            f"config.json: num_experts_per_tok ({cfg.num_experts_per_tok}) is not divisible by the number "
            f"of expert groups ({g}); set num_expert_groups to a divisor of both"
        )
    if cfg.num_experts_per_tok > cfg.num_experts:
        raise ConfigError(
            f"config.json: num_experts_per_tok ({cfg.num_experts_per_tok}) exceeds num_experts ({cfg.num_experts})"
        )


# Keys of other MoE families: a config holding them is not a MoGE model, whatever else it says.
_V2_KEYS = ("n_routed_experts", "n_shared_experts", "scoring_func", "topk_method", "n_group", "topk_group",
            "routed_scaling_factor", "first_k_dense_replace", "kv_lora_rank", "q_lora_rank")  # fmt: skip
_V2_MODEL_TYPES = ("pangu_ultra_moe", "pangu_v2")


def _refuse_other_families(d: dict[str, Any]) -> None:
    """openPangu V2 / Pangu Ultra MoE (DeepSeek-V3-style: n_routed_experts, sigmoid routing, no MoGE groups)
    shares the Pangu name but not the architecture: running it with MoGE semantics would be silently wrong."""
    model_type = str(d.get("model_type", "")).lower().replace("-", "_")
    archs = " ".join(map(str, d.get("architectures") or [])).lower()
    keys = [k for k in _V2_KEYS if k in d]
    if keys or any(t in model_type or t.replace("_", "") in archs for t in _V2_MODEL_TYPES):
        what = ", ".join(keys + ([f"scoring_func {d['scoring_func']!r}"] if "scoring_func" in d else []))
        raise ConfigError(
            f"config.json: an openPangu V2 / Pangu Ultra MoE (DeepSeek-V3-style) config (model_type {d.get('model_type')!r}"
            f"{', ' + what if what else ''}): routing over n_routed_experts with sigmoid scores and no expert groups, "
            f"not a MoGE model; moge supports Pangu Pro MoE (model_type {MODEL_TYPE!r})"
        )
    if d.get("partial_rotary_factor", 1) != 1:
        raise ConfigError(f"config.json: partial_rotary_factor {d['partial_rotary_factor']!r} is not supported (Pangu Pro MoE rotates every dim)")
    if d.get("use_sliding_window"):  # Qwen2-style key: false (or absent) in Pangu Pro MoE's config
        raise ConfigError(
            f"config.json: use_sliding_window is true (sliding_window {d.get('sliding_window')!r}): sliding-window attention "
            "is not supported (Pangu Pro MoE attends over the whole context); set it to false if the model was trained without it"
        )
    if d.get("decoder_sparse_step", 1) != 1:
        raise ConfigError(
            f"config.json: decoder_sparse_step {d['decoder_sparse_step']!r} is not supported "
            "(Pangu Pro MoE has experts in every layer but mlp_only_layers; use mlp_only_layers)"
        )


def _with_rope_parameters(d: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 writes rope_parameters (rope_theta inside) where older configs have rope_scaling."""
    params = d.get("rope_parameters")
    if params is None:
        return d
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: rope_parameters must be an object, got {params!r}")
    d = {k: v for k, v in d.items() if k != "rope_parameters"}
    params = dict(params)
    if "rope_theta" in params:
        theta = params.pop("rope_theta")
        if "rope_theta" in d and d["rope_theta"] != theta:
            raise ConfigError(f"config.json: rope_theta ({d['rope_theta']}) and rope_parameters.rope_theta ({theta}) differ")
        d["rope_theta"] = theta
    if d.get("rope_scaling") not in (None, params):
        raise ConfigError("config.json: rope_scaling and rope_parameters both set and differ; keep one")
    d["rope_scaling"] = params
    return d


# ---- rope_scaling -----------------------------------------------------------------------------------
# Hugging Face's RoPE types (transformers.modeling_rope_utils) for this family: which keys each takes.
ROPE_TYPES: dict[str, tuple[set[str], set[str]]] = {  # type -> (required keys, optional keys)
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor"}, set()),
    "yarn": ({"factor"}, {"original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
                          "mscale_all_dim", "truncate"}),  # fmt: skip
}


@dataclass(frozen=True)
class RopeScaling:
    """A checked rope_scaling: its type and the numbers its formula reads (defaults filled in as HF does)."""

    rope_type: str  # linear, dynamic, yarn
    factor: float
    original_max_position_embeddings: int  # yarn: pretraining length; dynamic: max_position_embeddings
    attention_factor: float | None = None  # yarn: scales cos and sin; None = derived from factor / mscale
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


def parse_rope_scaling(raw: Any, max_position_embeddings: int) -> RopeScaling | None:
    """rope_scaling as config.json holds it -> RopeScaling, None for none / "default"; ConfigError naming the key otherwise."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"config.json: rope_scaling must be an object or null, got {raw!r}")
    kinds = {raw[k] for k in ("type", "rope_type") if k in raw}
    if len(kinds) > 1:
        raise ConfigError(f"config.json: rope_scaling.type and rope_scaling.rope_type differ ({sorted(map(str, kinds))})")
    if not kinds:
        raise ConfigError("config.json: rope_scaling has no type (rope_scaling.rope_type: linear, dynamic or yarn)")
    kind = kinds.pop()
    params = {k: v for k, v in raw.items() if k not in ("type", "rope_type")}
    if kind == "default":
        if params:
            raise ConfigError(f"config.json: rope_scaling of type 'default' takes no parameters, got rope_scaling.{sorted(params)[0]}")
        return None
    if kind not in ROPE_TYPES:
        raise ConfigError(
            f"config.json: rope_scaling.rope_type {kind!r} is not supported; moge implements {', '.join(ROPE_TYPES)} (or 'default')"
        )
    required, optional = ROPE_TYPES[kind]
    for key in sorted(required - params.keys()):
        raise ConfigError(f"config.json: rope_scaling.{key} is required for {kind} scaling")
    for key in sorted(params.keys() - required - optional):
        raise ConfigError(f"config.json: rope_scaling.{key} is not a parameter of {kind} scaling (moge does not implement it)")

    def number(key: str, minimum: float | None = None) -> float | None:
        v = params.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            raise ConfigError(f"config.json: rope_scaling.{key} must be a number, got {v!r}")
        if minimum is not None and v < minimum:
            raise ConfigError(f"config.json: rope_scaling.{key} must be at least {minimum}, got {v}")
        return float(v)

    factor = number("factor", 1.0)
    original = params.get("original_max_position_embeddings", max_position_embeddings)
    if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
        raise ConfigError(f"config.json: rope_scaling.original_max_position_embeddings must be a positive integer, got {original!r}")
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConfigError(f"config.json: rope_scaling.truncate must be true or false, got {truncate!r}")
    attention = number("attention_factor", 0.0)
    return RopeScaling(
        kind, factor, original, attention, number("beta_fast") or 32.0, number("beta_slow") or 1.0,
        number("mscale"), number("mscale_all_dim"), truncate,
    )  # fmt: skip


def _check_types(cfg: MoGEConfig) -> None:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key in _REQUIRED:
        v = getattr(cfg, key)
        if not is_int(v):
            raise ConfigError(f"config.json: {key} must be an integer, got {type(v).__name__} {v!r}")
    for key in ("num_expert_groups", "intermediate_size", "max_position_embeddings"):
        v = getattr(cfg, key)
        if v is not None and not is_int(v):
            raise ConfigError(f"config.json: {key} must be an integer, got {type(v).__name__} {v!r}")
    for key in ("rms_norm_eps", "rope_theta"):
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"config.json: {key} must be a number, got {type(v).__name__} {v!r}")
    if not isinstance(cfg.mlp_only_layers, list) or not all(is_int(i) for i in cfg.mlp_only_layers):
        raise ConfigError(f"config.json: mlp_only_layers must be a list of layer indices, got {cfg.mlp_only_layers!r}")
    if not isinstance(cfg.tie_word_embeddings, bool):
        raise ConfigError(f"config.json: tie_word_embeddings must be true or false, got {cfg.tie_word_embeddings!r}")
    if cfg.hidden_act != "silu":
        raise ConfigError(f"config.json: hidden_act {cfg.hidden_act!r} is not supported (Pangu Pro MoE uses 'silu')")


_BASE = {"model_type": MODEL_TYPE, "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False}

# name -> config.json dict. Fixture shapes are here so tests, fixtures and benchmarks agree.
PRESETS: dict[str, dict[str, Any]] = {
    "pangu-pro-moe-72b": {
        **_BASE,
        "vocab_size": 153376,
        "hidden_size": 5120,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rope_theta": 16000000.0,
        "moe_intermediate_size": 1344,
        "shared_expert_intermediate_size": 5376,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "torch_dtype": "bfloat16",
    },
    # The committed fixtures/tiny-moge checkpoint: 2 layers, 4 groups x 2 experts, 1 pick each.
    "tiny-moge": {
        **_BASE,
        "vocab_size": 512,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "num_experts": 8,
        "num_experts_per_tok": 4,
        "torch_dtype": "bfloat16",
    },
    # fixtures/tiny-trained: a small MoGE trained on offline text (4 groups of 4 experts, 1 pick each).
    "tiny-trained": {
        **_BASE,
        "vocab_size": 2048,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 128,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "torch_dtype": "float32",
    },
    # The ~0.47B-parameter random model the runtime and quantization benchmarks use.
    "bench-0.47b": {
        **_BASE,
        "vocab_size": 8192,
        "hidden_size": 1024,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        "moe_intermediate_size": 256,
        "shared_expert_intermediate_size": 1024,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "torch_dtype": "bfloat16",
    },
}
