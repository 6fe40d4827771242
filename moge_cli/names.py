"""Tensor-name tables for the per-expert (released) and stacked layouts, as data.

Dimension letters: V vocab, H hidden, D head_dim, nH heads, nKV kv heads, E experts,
I moe_intermediate_size, Is shared_expert_intermediate_size, Id dense intermediate_size.
"""

from __future__ import annotations

import re
from typing import Iterator

from moge_cli.config import MoGEConfig

PER_EXPERT = "per-expert"
STACKED = "stacked"
LAYOUTS = (PER_EXPERT, STACKED)

# name template -> shape as a tuple of config-derived symbols (resolved by _dims).
GLOBAL = {
    "model.embed_tokens.weight": ("V", "H"),
    "model.norm.weight": ("H",),
    "lm_head.weight": ("V", "H"),
}
LAYER = {
    "model.layers.{L}.input_layernorm.weight": ("H",),
    "model.layers.{L}.post_attention_layernorm.weight": ("H",),
    "model.layers.{L}.self_attn.q_proj.weight": ("nHD", "H"),
    "model.layers.{L}.self_attn.q_proj.bias": ("nHD",),
    "model.layers.{L}.self_attn.k_proj.weight": ("nKVD", "H"),
    "model.layers.{L}.self_attn.k_proj.bias": ("nKVD",),
    "model.layers.{L}.self_attn.v_proj.weight": ("nKVD", "H"),
    "model.layers.{L}.self_attn.v_proj.bias": ("nKVD",),
    "model.layers.{L}.self_attn.o_proj.weight": ("H", "nHD"),
    "model.layers.{L}.self_attn.o_proj.bias": ("H",),
}
MOE = {
    "model.layers.{L}.mlp.gate.weight": ("E", "H"),
    "model.layers.{L}.mlp.router_scale": ("1", "E"),
}
SHARED = {  # MoE layers with a shared expert (shared_expert_intermediate_size > 0)
    "model.layers.{L}.mlp.shared_expert.gate_proj.weight": ("Is", "H"),
    "model.layers.{L}.mlp.shared_expert.up_proj.weight": ("Is", "H"),
    "model.layers.{L}.mlp.shared_expert.down_proj.weight": ("H", "Is"),
}
EXPERT = {  # per-expert layout, one set per expert e
    "model.layers.{L}.mlp.experts.{e}.gate_proj.weight": ("I", "H"),
    "model.layers.{L}.mlp.experts.{e}.up_proj.weight": ("I", "H"),
    "model.layers.{L}.mlp.experts.{e}.down_proj.weight": ("H", "I"),
}
STACKED_EXPERTS = {  # stacked layout: gate_up rows 0..I-1 gate_proj, I..2I-1 up_proj
    "model.layers.{L}.mlp.experts.gate_up_proj": ("E", "2I", "H"),
    "model.layers.{L}.mlp.experts.down_proj": ("E", "H", "I"),
}
DENSE = {  # mlp_only_layers (Qwen2-MoE convention), or every layer when num_experts is 0
    "model.layers.{L}.mlp.gate_proj.weight": ("Id", "H"),
    "model.layers.{L}.mlp.up_proj.weight": ("Id", "H"),
    "model.layers.{L}.mlp.down_proj.weight": ("H", "Id"),
}

PER_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
STACKED_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
QUANT_SUFFIX_RE = re.compile(r"\.weight_(packed|scale|shape|zero_point)$")

# Tensors real checkpoints carry that hold no weight of the model: skipped with a note, never loaded,
# carried unchanged by convert. Anything else not in expected_tensors stays an error.
ROPE_BUFFER = "RoPE inv_freq buffer(s), recomputed from rope_theta and rope_scaling"
KV_CACHE_QUANT = "KV-cache quantization scale/offset tensor(s) of a quantized attention export; moge keeps the KV cache in the model dtype"
TIED_HEAD = "lm_head.weight beside tie_word_embeddings: true; the model uses model.embed_tokens.weight (loading checks the two are equal)"
KNOWN_BUFFERS = {
    re.compile(r"^model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$"): ROPE_BUFFER,
    # msmodelslim C8 exports (vllm-ascend: k_proj/v_proj.kv_cache_scale/offset); vLLM's fp8 KV scales
    re.compile(r"^model\.layers\.\d+\.self_attn\.[kv]_proj\.kv_cache_(scale|offset)$"): KV_CACHE_QUANT,
    re.compile(r"^model\.layers\.\d+\.self_attn\.(attn\.[kv]_scale|k_proj\.k_scale|v_proj\.v_scale|kv_scale)$"): KV_CACHE_QUANT,
}


def skipped_reason(name: str, cfg: MoGEConfig) -> str | None:
    """Why a tensor outside expected_tensors is known and skipped (see KNOWN_BUFFERS), or None: unexpected."""
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return TIED_HEAD
    return next((why for pattern, why in KNOWN_BUFFERS.items() if pattern.match(name)), None)


def skipped_notes(names, cfg: MoGEConfig) -> tuple[list[str], list[str]]:
    """(skipped tensor names, one note per kind: count, an example and why) of the names outside expected_tensors."""
    by_reason: dict[str, list[str]] = {}
    for n in names:
        if (why := skipped_reason(n, cfg)) is not None:
            by_reason.setdefault(why, []).append(n)
    notes = [f"skipped {len(ns)} {why} (e.g. {ns[0]})" for why, ns in by_reason.items()]
    return [n for ns in by_reason.values() for n in ns], notes


def _dims(cfg: MoGEConfig) -> dict[str, int]:
    d = cfg.head_dim
    return {
        "1": 1,
        "V": cfg.vocab_size,
        "H": cfg.hidden_size,
        "nHD": cfg.num_attention_heads * d,
        "nKVD": cfg.num_key_value_heads * d,
        "E": cfg.num_experts,
        "I": cfg.moe_intermediate_size,
        "2I": 2 * cfg.moe_intermediate_size,
        "Is": cfg.shared_expert_intermediate_size,
        "Id": cfg.intermediate_size or 0,
    }


def _expand(table: dict[str, tuple[str, ...]], dims: dict[str, int], layer: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a per-layer table for one layer."""
    return {template.replace("{L}", str(layer)): tuple(dims[s] for s in shape) for template, shape in table.items()}


def _expand_experts(table: dict[str, tuple[str, ...]], dims: dict[str, int], layer: int, n_experts: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a per-expert table for every expert of one layer (expert-major, as in the files)."""
    parts = [(*template.replace("{L}", str(layer)).split("{e}"), tuple(dims[s] for s in shape)) for template, shape in table.items()]
    return {f"{head}{e}{tail}": shape for e in range(n_experts) for head, tail, shape in parts}


def layer_tensors(cfg: MoGEConfig, layer: int, layout: str) -> dict[str, tuple[int, ...]]:
    """Expected name -> shape of one decoder layer in `layout`."""
    dims = _dims(cfg)
    out = _expand(LAYER, dims, layer)
    if cfg.is_dense(layer):
        out.update(_expand(DENSE, dims, layer))
        return out
    out.update(_expand(MOE, dims, layer))
    if cfg.has_shared_expert:
        out.update(_expand(SHARED, dims, layer))
    if layout == STACKED:
        out.update(_expand(STACKED_EXPERTS, dims, layer))
    else:
        out.update(_expand_experts(EXPERT, dims, layer, cfg.num_experts))
    return out


def expected_tensors(cfg: MoGEConfig, layout: str = PER_EXPERT) -> dict[str, tuple[int, ...]]:
    """Every tensor name -> shape a complete checkpoint of `cfg` in `layout` holds, in file order."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    dims = _dims(cfg)
    out = {"model.embed_tokens.weight": (dims["V"], dims["H"])}
    for layer in range(cfg.num_hidden_layers):
        out.update(layer_tensors(cfg, layer, layout))
    out["model.norm.weight"] = (dims["H"],)
    if not cfg.tie_word_embeddings:  # tied: the embedding matrix is the output projection
        out["lm_head.weight"] = (dims["V"], dims["H"])
    return out


def detect_layout(names: list[str] | set[str]) -> str:
    """per-expert, stacked, mixed (both kinds of expert tensor) or unknown (no expert tensors)."""
    if any(n.endswith(".weight_packed") for n in names):  # quantized (compressed-tensors): X.weight_* stands for X.weight
        names = {QUANT_SUFFIX_RE.sub(".weight", n) for n in names}
    per_expert = any(PER_EXPERT_RE.match(n) for n in names)
    stacked = any(STACKED_RE.match(n) for n in names)
    if per_expert and stacked:
        return "mixed"
    if per_expert:
        return PER_EXPERT
    if stacked:
        return STACKED
    return "unknown"


def layer_of(name: str) -> int | None:
    """Decoder-layer index a tensor belongs to, or None for global tensors."""
    m = LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def component_of(name: str) -> str:
    """Which parameter group a tensor counts towards (load's breakdown, quantize's summary)."""
    if name == "model.embed_tokens.weight":
        return "embeddings"
    if name == "lm_head.weight":
        return "lm_head"
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return "norms"
    if ".self_attn." in name:
        return "attention"
    if ".mlp.gate.weight" in name or name.endswith(".mlp.router_scale"):
        return "router"
    if ".mlp.shared_expert." in name:
        return "shared_experts"
    if ".mlp.experts." in name:
        return "routed_experts"
    if re.search(r"\.mlp\.(gate|up|down)_proj\.weight$", name):
        return "dense_mlp"
    return "other"
