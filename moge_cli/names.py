"""The tensor vocabulary: every kind of checkpoint tensor, as data, and what is derived from it.

One row per kind (KINDS): its checkpoint name template ({L} decoder layer, {e} routed expert), its
shape in dimension symbols, where it occurs (PARTS), the model parameter it fills, the module
quantize may replace, and the component it counts towards. Name tables, regexes, expected tensors
and parameter sources are derived from it, once. A new tensor name goes here and nowhere else.

Dimension letters: V vocab, H hidden, D head_dim, nH heads, nKV kv heads, E experts,
I moe_intermediate_size, Is shared_expert_intermediate_size, Id dense intermediate_size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moge_cli.config import MoGEConfig

PER_EXPERT = "per-expert"
STACKED = "stacked"
LAYOUTS = (PER_EXPERT, STACKED)


@dataclass(frozen=True)
class Kind:
    """One kind of checkpoint tensor."""

    template: str  # checkpoint name; {L} decoder layer, {e} routed expert
    shape: tuple[str, ...]  # dimension symbols, resolved by _dims
    part: str  # where it occurs: one of PARTS
    component: str  # parameter group: load's breakdown, quantize's selection, profile
    param: str  # the model parameter it fills; kinds filling one parameter are concatenated in table order
    quantizable: bool = False  # a 2-D weight: quantize may replace it by its module's packed tensors

    @property
    def module(self) -> str | None:
        """The module quantize replaces (template less `.weight`), or None."""
        return module_of(self.template) if self.quantizable else None


def module_of(weight_name: str) -> str:
    """The module a weight belongs to: its name less `.weight` (model.norm.weight -> model.norm)."""
    return weight_name.removesuffix(".weight")


LAYER_PREFIX = "model.layers.{L}."  # every tensor of decoder layer L
EXPERT_PREFIX = LAYER_PREFIX + "mlp.experts.{e}."  # every tensor of routed expert e (per-expert layout)
KINDS: dict[str, Kind] = {
    "embed": Kind("model.embed_tokens.weight", ("V", "H"), "global", "embeddings", "embed_tokens", True),
    "input_norm": Kind(LAYER_PREFIX + "input_layernorm.weight", ("H",), "layer", "norms", "layers.{L}.input_layernorm"),
    "post_attention_norm": Kind(LAYER_PREFIX + "post_attention_layernorm.weight", ("H",), "layer", "norms", "layers.{L}.post_attention_layernorm"),
    "q_proj": Kind(LAYER_PREFIX + "self_attn.q_proj.weight", ("nHD", "H"), "layer", "attention", "layers.{L}.self_attn.qkv_weight", True),
    "q_bias": Kind(LAYER_PREFIX + "self_attn.q_proj.bias", ("nHD",), "layer", "attention", "layers.{L}.self_attn.qkv_bias"),
    "k_proj": Kind(LAYER_PREFIX + "self_attn.k_proj.weight", ("nKVD", "H"), "layer", "attention", "layers.{L}.self_attn.qkv_weight", True),
    "k_bias": Kind(LAYER_PREFIX + "self_attn.k_proj.bias", ("nKVD",), "layer", "attention", "layers.{L}.self_attn.qkv_bias"),
    "v_proj": Kind(LAYER_PREFIX + "self_attn.v_proj.weight", ("nKVD", "H"), "layer", "attention", "layers.{L}.self_attn.qkv_weight", True),
    "v_bias": Kind(LAYER_PREFIX + "self_attn.v_proj.bias", ("nKVD",), "layer", "attention", "layers.{L}.self_attn.qkv_bias"),
    "o_proj": Kind(LAYER_PREFIX + "self_attn.o_proj.weight", ("H", "nHD"), "layer", "attention", "layers.{L}.self_attn.o_weight", True),
    "o_bias": Kind(LAYER_PREFIX + "self_attn.o_proj.bias", ("H",), "layer", "attention", "layers.{L}.self_attn.o_bias"),
    "router_gate": Kind(LAYER_PREFIX + "mlp.gate.weight", ("E", "H"), "moe", "router", "layers.{L}.mlp.gate"),
    "router_scale": Kind(LAYER_PREFIX + "mlp.router_scale", ("1", "E"), "moe", "router", "layers.{L}.mlp.router_scale"),
    "shared_gate": Kind(LAYER_PREFIX + "mlp.shared_expert.gate_proj.weight", ("Is", "H"), "shared", "shared_experts", "layers.{L}.mlp.shared_w13", True),
    "shared_up": Kind(LAYER_PREFIX + "mlp.shared_expert.up_proj.weight", ("Is", "H"), "shared", "shared_experts", "layers.{L}.mlp.shared_w13", True),
    "shared_down": Kind(LAYER_PREFIX + "mlp.shared_expert.down_proj.weight", ("H", "Is"), "shared", "shared_experts", "layers.{L}.mlp.shared_w2", True),
    # per-expert layout, one set per expert e (expert-major in files and in the stacked parameter)
    "expert_gate": Kind(EXPERT_PREFIX + "gate_proj.weight", ("I", "H"), "expert", "routed_experts", "layers.{L}.mlp.gate_up", True),
    "expert_up": Kind(EXPERT_PREFIX + "up_proj.weight", ("I", "H"), "expert", "routed_experts", "layers.{L}.mlp.gate_up", True),
    "expert_down": Kind(EXPERT_PREFIX + "down_proj.weight", ("H", "I"), "expert", "routed_experts", "layers.{L}.mlp.down", True),
    # stacked layout: gate_up rows 0..I-1 gate_proj, I..2I-1 up_proj of each expert
    "experts_gate_up": Kind(LAYER_PREFIX + "mlp.experts.gate_up_proj", ("E", "2I", "H"), "stacked", "routed_experts", "layers.{L}.mlp.gate_up"),
    "experts_down": Kind(LAYER_PREFIX + "mlp.experts.down_proj", ("E", "H", "I"), "stacked", "routed_experts", "layers.{L}.mlp.down"),
    # mlp_only_layers (Qwen2-MoE convention), or every layer when num_experts is 0
    "dense_gate": Kind(LAYER_PREFIX + "mlp.gate_proj.weight", ("Id", "H"), "dense", "dense_mlp", "layers.{L}.mlp.w13", True),
    "dense_up": Kind(LAYER_PREFIX + "mlp.up_proj.weight", ("Id", "H"), "dense", "dense_mlp", "layers.{L}.mlp.w13", True),
    "dense_down": Kind(LAYER_PREFIX + "mlp.down_proj.weight", ("H", "Id"), "dense", "dense_mlp", "layers.{L}.mlp.w2", True),
    "norm": Kind("model.norm.weight", ("H",), "global", "norms", "norm"),
    "lm_head": Kind("lm_head.weight", ("V", "H"), "head", "lm_head", "lm_head", True),  # absent when tie_word_embeddings
}
PARTS = ("global", "layer", "moe", "shared", "expert", "stacked", "dense", "head")
PROJS = ("gate_proj", "up_proj", "down_proj")  # an expert's three weights, in file order
EXPERT_KINDS = {"gate_proj": "expert_gate", "up_proj": "expert_up", "down_proj": "expert_down"}
STACKED_KINDS = {"gate_up_proj": "experts_gate_up", "down_proj": "experts_down"}


def tensor_name(kind: str, layer: int | None = None, expert: int | None = None) -> str:
    """The checkpoint name of one tensor: tensor_name("expert_down", 3, 7) -> model.layers.3.mlp.experts.7.down_proj.weight."""
    return _fill(KINDS[kind].template, layer, expert)


def module_name(kind: str, layer: int | None = None, expert: int | None = None) -> str:
    """The module of one quantizable tensor: module_name("expert_down", 3, 7) -> model.layers.3.mlp.experts.7.down_proj."""
    return _fill(KINDS[kind].module, layer, expert)


def part_kinds(part: str) -> list[str]:
    """The kinds of one part (PARTS), in table order: part_kinds("shared") -> shared_gate, shared_up, shared_down."""
    return [k for k, kind in KINDS.items() if kind.part == part]


def _fill(template: str, layer: int | None = None, expert: int | None = None) -> str:
    if layer is not None:
        template = template.replace("{L}", str(layer))
    return template if expert is None else template.replace("{e}", str(expert))


def expert_name(layer: int, expert: int, proj: str) -> str:
    """A per-expert weight's name; proj is gate_proj, up_proj or down_proj."""
    return tensor_name(EXPERT_KINDS[proj], layer, expert)


def stacked_name(layer: int, which: str) -> str:
    """A stacked expert tensor's name; which is gate_up_proj or down_proj."""
    return tensor_name(STACKED_KINDS[which], layer)


def _pattern(kinds: list[str]) -> re.Pattern:
    """One regex for templates that differ in one dotted segment: {L} and {e} captured as numbers, then that segment."""
    split = [KINDS[k].template.split(".") for k in kinds]
    i = next(i for i in range(len(split[0])) if len({s[i] for s in split}) > 1)
    parts = [r"(\d+)" if p in ("{L}", "{e}") else re.escape(p) for p in split[0]]
    parts[i] = "(" + "|".join(re.escape(s[i]) for s in split) + ")"
    return re.compile("^" + r"\.".join(parts) + "$")


PER_EXPERT_RE = _pattern(list(EXPERT_KINDS.values()))  # (layer, expert, proj)
STACKED_RE = _pattern(list(STACKED_KINDS.values()))  # (layer, gate_up_proj | down_proj)


def numbered(template: str, number: str = r"(\d+)") -> str:
    """`template` as a regex whose {L} and {e} match numbers (captured by default)."""
    return re.escape(template).replace(re.escape("{L}"), number).replace(re.escape("{e}"), number)


LAYER_RE = re.compile("^" + numbered(LAYER_PREFIX))  # (layer)
EXPERT_EXTRA_RE = re.compile("^" + numbered(EXPERT_PREFIX) + "(.+)$")  # (layer, expert, rest): any tensor of one expert, e.g. W8A8 scales
# A quantized module X stores these tensors instead of X.weight (compressed-tensors pack-quantized; their shapes
# and meaning: moge_cli/quant_format.py), X.weight_zero_point only when asymmetric.
QUANT_SUFFIXES = PACKED, SCALE, SHAPE, ZERO_POINT = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
QUANT_SUFFIX_RE = re.compile(r"\.(%s)$" % "|".join(QUANT_SUFFIXES))  # X.weight_* stands for X.weight


def quant_name(module: str, suffix: str) -> str:
    """One stored tensor of a quantized module: quant_name("lm_head", PACKED) -> lm_head.weight_packed."""
    return f"{module}.{suffix}"


def _template_of(name: str) -> str | None:
    """The name as a KINDS template would spell it: its first all-digit segment {L}, its second {e}
    (model.layers.3.mlp.experts.7.down_proj.weight -> model.layers.{L}.mlp.experts.{e}.down_proj.weight).
    A dictionary lookup then finds its kind: no regex over the whole table to compile."""
    if "{" in name:
        return None
    parts, count = name.split("."), 0
    for i, p in enumerate(parts):
        if p.isdecimal():  # as the regex \d+ would match it
            parts[i] = "{e}" if count else "{L}"
            count += 1
            if count == 2:
                break
    return ".".join(parts)


_KIND_OF_TEMPLATE = {kind.template: k for k, kind in KINDS.items()}


def kind_of_name(name: str) -> str | None:
    """The kind (a KINDS key) of a checkpoint tensor name; a quantized module's tensors count as its weight. None: not in the vocabulary."""
    return _KIND_OF_TEMPLATE.get(_template_of(QUANT_SUFFIX_RE.sub(".weight", name)))


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


def _scopes() -> dict[str, str]:
    """Template -> component, for every kind's template and, for weights and biases, the module holding them
    (model.layers.{L}.self_attn.q_proj: attention), so that other tensors of that module count with it."""
    out = {}
    for kind in KINDS.values():
        owner, _, leaf = kind.template.rpartition(".")
        for scope in (kind.template, owner) if leaf in ("weight", "bias") else (kind.template,):
            assert out.setdefault(scope, kind.component) == kind.component, scope  # one component per module
    return out


_COMPONENT_OF_SCOPE = _scopes()


def component_of(name: str) -> str:
    """Which parameter group a tensor counts towards (load's breakdown, quantize's summary, weight stats): its
    kind's component (a quantized module's tensors: their weight's). Buffers (KNOWN_BUFFERS) are "other"; any
    other name outside the vocabulary counts with the nearest module of the table that holds it (W8A8's
    X.input_scale or X.weight_offset: X's component), else it is "other"."""
    scope = _template_of(QUANT_SUFFIX_RE.sub(".weight", name))
    if scope not in _COMPONENT_OF_SCOPE and any(pattern.match(name) for pattern in KNOWN_BUFFERS):
        return "other"
    while scope:
        if (component := _COMPONENT_OF_SCOPE.get(scope)) is not None:
            return component
        scope = scope.rpartition(".")[0]
    return "other"


def skipped_reason(name: str, cfg: MoGEConfig) -> str | None:
    """Why a tensor outside expected_tensors is known and skipped (see KNOWN_BUFFERS), or None: unexpected."""
    if name == tensor_name("lm_head") and cfg.tie_word_embeddings:
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


def kind_shapes(cfg: MoGEConfig) -> dict[str, tuple[int, ...]]:
    """Kind -> the shape of its tensors under cfg."""
    dims = _dims(cfg)
    return {k: tuple(dims[s] for s in kind.shape) for k, kind in KINDS.items()}


def _layer_kinds(cfg: MoGEConfig, layer: int, layout: str) -> list[str]:
    """The kinds one decoder layer holds in `layout`, in file order (expert kinds once: expanded per expert)."""
    if cfg.is_dense(layer):
        parts = ("layer", "dense")
    else:
        parts = ("layer", "moe", *(("shared",) if cfg.has_shared_expert else ()), "stacked" if layout == STACKED else "expert")
    return [k for part in parts for k in part_kinds(part)]


def layer_entries(cfg: MoGEConfig, layer: int, layout: str) -> list[tuple[str, str]]:
    """(name, kind) of every tensor of one decoder layer in `layout`, in file order (experts expert-major)."""
    fixed, experts = [], []
    for k in _layer_kinds(cfg, layer, layout):
        (experts if KINDS[k].part == "expert" else fixed).append((_fill(KINDS[k].template, layer), k))
    split = [(*t.split("{e}"), k) for t, k in experts]
    return fixed + [(f"{head}{e}{tail}", k) for e in range(cfg.num_experts) for head, tail, k in split]


def layer_tensors(cfg: MoGEConfig, layer: int, layout: str) -> dict[str, tuple[int, ...]]:
    """Expected name -> shape of one decoder layer in `layout`."""
    shapes = kind_shapes(cfg)
    return {n: shapes[k] for n, k in layer_entries(cfg, layer, layout)}


def entries(cfg: MoGEConfig, layout: str = PER_EXPERT) -> list[tuple[str, str]]:
    """(name, kind) of every tensor a complete checkpoint of `cfg` in `layout` holds, in file order."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    out = [(tensor_name("embed"), "embed")]
    for layer in range(cfg.num_hidden_layers):
        out += layer_entries(cfg, layer, layout)
    out.append((tensor_name("norm"), "norm"))
    if not cfg.tie_word_embeddings:  # tied: the embedding matrix is the output projection
        out.append((tensor_name("lm_head"), "lm_head"))
    return out


def expected_tensors(cfg: MoGEConfig, layout: str = PER_EXPERT) -> dict[str, tuple[int, ...]]:
    """Every tensor name -> shape a complete checkpoint of `cfg` in `layout` holds, in file order."""
    shapes = kind_shapes(cfg)
    return {n: shapes[k] for n, k in entries(cfg, layout)}


def parameter_sources(cfg: MoGEConfig, layout: str) -> dict[str, list[str]]:
    """Every model parameter -> the checkpoint tensors (in `layout`) whose contents, concatenated in order, fill it."""
    out: dict[str, list[str]] = {}
    for n, k in entries(cfg, layout):
        layer = layer_of(n)
        param = _fill(KINDS[k].param, layer)
        out.setdefault(param, []).append(n)
    return out


def with_layer(name: str, layer: int) -> str:
    """A decoder layer's tensor name, renumbered to `layer`."""
    return LAYER_RE.sub(_fill(LAYER_PREFIX, layer), name, count=1)


def with_expert(name: str, expert: int) -> str:
    """A routed expert's tensor name, renumbered to `expert`."""
    m = EXPERT_EXTRA_RE.match(name)
    return _fill(EXPERT_PREFIX, int(m.group(1)), expert) + m.group(3)


def detect_layout(names: list[str] | set[str]) -> str:
    """per-expert, stacked, mixed (both kinds of expert tensor) or unknown (no expert tensors)."""
    if any(n.endswith("." + PACKED) for n in names):  # quantized (compressed-tensors): X.weight_* stands for X.weight
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
