"""MoGEConfig: the Pangu Pro MoE config.json, validated, with derived sizes and presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moge_cli.errors import ConfigError

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
    moe_layers, dense_layers.
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
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    model_type: str = MODEL_TYPE
    architectures: list[str] = field(default_factory=lambda: ["PanguProMoEForCausalLM"])
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept verbatim

    def __post_init__(self) -> None:
        _check_types(self)
        for key in _REQUIRED:
            if getattr(self, key) <= 0:
                raise ConfigError(f"config.json: {key} must be a positive integer, got {getattr(self, key)}")
        if self.num_expert_groups is None:
            self.num_expert_groups = self.num_experts_per_tok
        g = self.num_expert_groups
        if g <= 0:
            raise ConfigError(f"config.json: num_expert_groups must be a positive integer, got {g}")
        if self.num_experts % g:
            raise ConfigError(
                f"config.json: num_experts ({self.num_experts}) is not divisible by the number of expert "
                f"groups ({g}); set num_expert_groups to a divisor of both num_experts and num_experts_per_tok"
            )
        if self.num_experts_per_tok % g:
            raise ConfigError(
                f"config.json: num_experts_per_tok ({self.num_experts_per_tok}) is not divisible by the number "
                f"of expert groups ({g}); set num_expert_groups to a divisor of both"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"config.json: num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})"
            )
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
        if self.mlp_only_layers and (self.intermediate_size is None or self.intermediate_size <= 0):
            raise ConfigError("config.json: mlp_only_layers is set, so intermediate_size (dense MLP width) is required")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("config.json: rms_norm_eps and rope_theta must be positive")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def n_groups(self) -> int:
        return int(self.num_expert_groups)

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.n_groups

    @property
    def picks_per_group(self) -> int:
        return self.num_experts_per_tok // self.n_groups

    @property
    def dense_layers(self) -> list[int]:
        return sorted(set(self.mlp_only_layers))

    @property
    def moe_layers(self) -> list[int]:
        dense = set(self.mlp_only_layers)
        return [i for i in range(self.num_hidden_layers) if i not in dense]

    # ---- (de)serialisation ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoGEConfig":
        """Build from a config.json dict; unknown keys go to `extra`, missing required keys raise."""
        if not isinstance(d, dict):
            raise ConfigError("config.json: expected a JSON object at top level")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"config.json: missing required key(s) {', '.join(missing)}")
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
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
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
        if d["intermediate_size"] is None:
            del d["intermediate_size"]
        if d["num_expert_groups"] == d["num_experts_per_tok"] and "num_expert_groups" not in self.extra:
            del d["num_expert_groups"]
        d.update(self.extra)
        return dict(sorted(d.items()))


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
