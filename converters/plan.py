"""The conversion plan: every output tensor as a recipe over source tensors, from the headers alone.

A recipe is a list of Parts, each a contiguous element range of one source tensor; the output is
their concatenation, cast to the output dtype. Every transform is such a list:
rename (one whole part), stack (per-expert -> [E, 2I, H]: gate_e, up_e, gate_e+1, ... back to back),
split (stacked -> per-expert: one row block each), filter (--layers, --ep: parts left out), and the
expert-parallel slice (a run of whole experts). Casting is elementwise, so it commutes with all of them.
Dimension letters: E experts (El on one rank), I moe_intermediate_size, H hidden.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any

from moge_cli.config import MoGEConfig
from moge_cli.dtypes import FLOAT_CODES, NAMES as DTYPES
from moge_cli.errors import CheckpointError, UsageError
from moge_cli.names import (
    EXPERT_EXTRA_RE, EXPERT_KINDS, LAYOUTS, PACKED, PER_EXPERT, PER_EXPERT_RE, PROJS, STACKED, STACKED_KINDS, STACKED_RE,
    detect_layout, expected_tensors, expert_name, kind_shapes, layer_of, stacked_name, with_expert, with_layer,
)  # fmt: skip
from moge_cli.safetensors_format import DTYPE_SIZES, FROM_TORCH_NAME, TORCH_NAMES, TensorInfo


@dataclass(frozen=True)
class Part:
    """`count` elements of source tensor `source`, starting at flat element `start`."""

    source: str
    start: int
    count: int


@dataclass(frozen=True)
class OutTensor:
    """One output tensor: name, dtype and shape, and the recipe that produces its bytes."""

    name: str
    dtype: str  # safetensors code of the output
    shape: tuple[int, ...]
    src_dtype: str  # code every part is read as
    parts: tuple[Part, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    @property
    def cast(self) -> bool:
        return self.dtype != self.src_dtype

    def recipe(self) -> str:
        """A short human description: copy / stack of n / slice of a source, plus the cast."""
        if len(self.parts) > 1:
            what = f"stack {len(self.parts)} parts"
        else:
            what = f"{self.parts[0].source}" + ("" if self.parts[0].start == 0 else f"[{self.parts[0].start}:]")
        return what + (f" as {TORCH_NAMES[self.dtype]}" if self.cast else "")


@dataclass
class RankPlan:
    """What one output directory holds: subdir ('' without --ep), its config.json, its tensors in file order."""

    subdir: str
    config: dict[str, Any]
    tensors: list[OutTensor]
    experts: list[int]  # global ids of the routed experts it holds


@dataclass
class Plan:
    layout: str  # output layout
    src_layout: str
    dtype: str | None  # --dtype, or None to keep
    ranks: list[RankPlan]
    ep_plan: dict[str, Any] | None = None
    sources_used: set[str] = field(default_factory=set)

    @property
    def tensors(self) -> list[OutTensor]:
        return [t for r in self.ranks for t in r.tensors]


def parse_layers(text: str, num_layers: int) -> list[int]:
    """'0-1,5' -> [0, 1, 5]: sorted, unique, each within 0..num_layers-1."""
    keep: set[int] = set()
    for item in text.replace(" ", "").split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise UsageError(f"--layers {text!r}: expected a list like 0-1,5 (indices and inclusive ranges)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UsageError(f"--layers {text!r}: range {item} runs backwards")
        keep.update(range(lo, hi + 1))
    bad = sorted(i for i in keep if i >= num_layers)
    if bad:
        raise UsageError(f"--layers {text!r}: layer(s) {bad} do not exist; the model has layers 0..{num_layers - 1}")
    return sorted(keep)


def ep_ranks(cfg: MoGEConfig, world: int) -> list[list[int]]:
    """Global expert ids of each rank: rank r holds groups r*G/N .. (r+1)*G/N-1, whole."""
    g = cfg.n_groups
    if not cfg.num_experts:
        raise UsageError(f"--ep {world}: the model has no experts (num_experts 0); expert parallelism has nothing to split")
    if world < 1 or g % world:
        raise UsageError(f"--ep {world}: the model has {g} expert groups; N must divide it (try one of {[d for d in range(1, g + 1) if g % d == 0]})")
    per_rank = cfg.num_experts // world
    return [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(world)]


def build_plan(
    tensors: dict[str, TensorInfo],
    config: dict[str, Any],
    *,
    layout: str | None = None,
    dtype: str | None = None,
    layers: str | list[int] | None = None,
    ep: int | None = None,
) -> Plan:
    """Plan the conversion of `tensors` (source headers) with `config` (source config.json dict).

    Raises UsageError for impossible options, CheckpointError when the source cannot be stacked.
    """
    cfg = MoGEConfig.from_dict(config)
    src_ep = config.get("moge_ep")
    if src_ep and ep:
        raise UsageError("the source is already one rank of an expert-parallel split (config.json has moge_ep); convert the full checkpoint")
    src_layout = detect_layout(set(tensors))
    if layout is not None and layout not in LAYOUTS:
        raise UsageError(f"--layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if dtype is not None and dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if layout is None:
        if src_layout == "mixed":
            raise UsageError("the source mixes per-expert and stacked expert tensors; choose the output with --layout")
        layout = src_layout if src_layout in LAYOUTS else PER_EXPERT
    if layout == STACKED and (packed := sorted(n for n in tensors if EXPERT_EXTRA_RE.match(n) and n.endswith("." + PACKED))):
        raise UsageError(
            f"--layout stacked: the source's experts are quantized ({len(packed)} such as {packed[0]}); quantized experts are "
            "stored one per expert, as vLLM loads them, and moge does not stack them. Convert the float checkpoint to stacked, "
            "or keep the per-expert layout"
        )
    if isinstance(layers, str):
        layers = parse_layers(layers, cfg.num_hidden_layers)
    keep = list(range(cfg.num_hidden_layers)) if layers is None else list(layers)
    if not keep:
        raise UsageError("--layers keeps no layer")
    new_of = {old: new for new, old in enumerate(keep)}
    n_src = len(src_ep["experts"]) if src_ep else cfg.num_experts  # expert ids in a rank dir's names are local
    rank_experts = ep_ranks(cfg, ep) if ep else [list(range(n_src))]

    experts, others = _decompose(tensors, cfg, n_src)
    out_code = FROM_TORCH_NAME[dtype] if dtype else None

    def out_dtype(code: str) -> str:
        return out_code if out_code and code in FLOAT_CODES else code

    base = _out_config(config, cfg, keep, new_of, dtype)
    out_cfg = MoGEConfig.from_dict(base)
    canon = expected_tensors(out_cfg, layout)
    plan = Plan(layout=layout, src_layout=src_layout, dtype=dtype, ranks=[])
    for r, mine in enumerate(rank_experts):
        local_of = {g: i for i, g in enumerate(mine)}
        outs = _renamed_others(others, new_of, local_of, out_dtype)
        outs += _expert_outputs(experts, cfg, layout, new_of, mine, local_of, out_dtype)
        conf = copy.deepcopy(base)
        if ep:
            conf["moge_ep"] = {"rank": r, "world_size": ep, "experts": mine}
        held = list(src_ep["experts"]) if src_ep else mine
        plan.ranks.append(RankPlan(f"rank-{r}" if ep else "", conf, _ordered(outs, canon), held))
    if ep:
        plan.ep_plan = ep_plan_json(cfg, layout, rank_experts)
    plan.sources_used = {p.source for t in plan.tensors for p in t.parts}
    return plan


def ep_plan_json(cfg: MoGEConfig, layout: str, rank_experts: list[list[int]]) -> dict[str, Any]:
    """ep_plan.json: ranks with their groups and experts, and global expert id -> (rank, local id)."""
    per_group = cfg.experts_per_group
    return {
        "format": "moge-ep/1",
        "world_size": len(rank_experts),
        "num_experts": cfg.num_experts,
        "num_expert_groups": cfg.n_groups,
        "layout": layout,
        "ranks": [
            {"rank": r, "path": f"rank-{r}", "groups": sorted({e // per_group for e in mine}), "experts": mine}
            for r, mine in enumerate(rank_experts)
        ],
        "experts": [{"expert": e, "rank": r, "local": i} for r, mine in enumerate(rank_experts) for i, e in enumerate(mine)],
    }


# ---- decomposition: source tensors -> logical expert slices + everything else -------------------
Slice = tuple[Part, tuple[int, ...], str]  # (part, shape, dtype code)


def _decompose(tensors: dict[str, TensorInfo], cfg: MoGEConfig, n_experts: int) -> tuple[dict[tuple[int, int, str], Slice], list[TensorInfo]]:
    """(layer, expert, proj) -> its slice of a source tensor; the rest in source order."""
    shapes = kind_shapes(cfg)
    experts: dict[tuple[int, int, str], Slice] = {}
    others: list[TensorInfo] = []
    for name, info in tensors.items():
        if m := PER_EXPERT_RE.match(name):
            experts[(int(m.group(1)), int(m.group(2)), m.group(3))] = (Part(name, 0, info.numel), info.shape, info.dtype)
        elif m := STACKED_RE.match(name):
            layer, which = int(m.group(1)), m.group(2)
            want = (n_experts, *shapes[STACKED_KINDS[which]][1:])  # [E, 2I, H] or [E, H, I]; a rank directory's own E
            if info.shape != want:
                raise CheckpointError(f"{name}: shape {list(info.shape)}, but config.json says {list(want)}; cannot split it into experts")
            block = math.prod(want[1:])
            for e in range(n_experts):
                if which == "gate_up_proj":  # rows 0..I-1 gate_proj, I..2I-1 up_proj
                    experts[(layer, e, "gate_proj")] = (Part(name, e * block, block // 2), shapes["expert_gate"], info.dtype)
                    experts[(layer, e, "up_proj")] = (Part(name, e * block + block // 2, block // 2), shapes["expert_up"], info.dtype)
                else:
                    experts[(layer, e, "down_proj")] = (Part(name, e * block, block), shapes["expert_down"], info.dtype)
        else:
            others.append(info)
    return experts, others


def _renamed_others(others: list[TensorInfo], new_of: dict[int, int], local_of: dict[int, int], out_dtype) -> list[OutTensor]:
    """Non-expert tensors (and per-expert extras such as scales): layer renumbered, dropped layers left out."""
    outs = []
    for info in others:
        name = info.name
        layer = layer_of(name)
        if layer is not None:
            if layer not in new_of:
                continue
            name = with_layer(name, new_of[layer])
        if m := EXPERT_EXTRA_RE.match(name):  # an extra tensor of one expert travels with that expert
            e = int(m.group(2))
            if e not in local_of:
                continue
            name = with_expert(name, local_of[e])
        outs.append(OutTensor(name, out_dtype(info.dtype), info.shape, info.dtype, (Part(info.name, 0, info.numel),)))
    return outs


def _expert_outputs(experts, cfg: MoGEConfig, layout: str, new_of, mine: list[int], local_of, out_dtype) -> list[OutTensor]:
    shapes = kind_shapes(cfg)
    outs: list[OutTensor] = []
    for old in sorted({k[0] for k in experts}):
        if old not in new_of:
            continue
        new = new_of[old]
        if layout == PER_EXPERT:
            for e in mine:
                for proj in PROJS:
                    if (s := experts.get((old, e, proj))) is not None:
                        outs.append(OutTensor(expert_name(new, local_of[e], proj), out_dtype(s[2]), s[1], s[2], (s[0],)))
            continue
        missing = [f"{e}.{p}" for e in mine for p in PROJS if (old, e, p) not in experts]
        if missing:
            raise CheckpointError(f"layer {old}: cannot stack the experts, missing {len(missing)} expert tensor(s): {', '.join(missing[:6])}")
        slices = {(e, p): experts[(old, e, p)] for e in mine for p in PROJS}
        for (e, p), (_, shape, _) in slices.items():
            want = shapes[EXPERT_KINDS[p]]
            if shape != want:
                raise CheckpointError(f"{expert_name(old, e, p)}: shape {list(shape)}, config.json says {list(want)}")
        codes = {s[2] for s in slices.values()}
        if len(codes) > 1:
            raise CheckpointError(f"layer {old}: expert tensors mix dtypes {sorted(TORCH_NAMES[c] for c in codes)}; cannot stack them")
        code = codes.pop()
        gate_up = [slices[(e, p)][0] for e in mine for p in ("gate_proj", "up_proj")]
        down = [slices[(e, "down_proj")][0] for e in mine]
        for which, parts in (("gate_up_proj", gate_up), ("down_proj", down)):  # [El, 2I, H], [El, H, I]
            shape = (len(mine), *shapes[STACKED_KINDS[which]][1:])
            outs.append(OutTensor(stacked_name(new, which), out_dtype(code), shape, code, _coalesce(parts)))
    return outs


def _coalesce(parts: list[Part]) -> tuple[Part, ...]:
    """Merge runs of adjacent parts of one source (stacked -> stacked slices become one copy)."""
    out: list[Part] = []
    for p in parts:
        if out and out[-1].source == p.source and out[-1].start + out[-1].count == p.start:
            out[-1] = Part(p.source, out[-1].start, out[-1].count + p.count)
        else:
            out.append(p)
    return tuple(out)


def _ordered(outs: list[OutTensor], canon: dict[str, tuple[int, ...]]) -> list[OutTensor]:
    """Canonical file order (expected_tensors of the output); extras after the last known tensor of their layer."""
    rank = {n: i for i, n in enumerate(canon)}
    last_in_layer: dict[int, int] = {}
    for n, i in rank.items():
        if (layer := layer_of(n)) is not None:
            last_in_layer[layer] = i
    names = [t.name for t in outs]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(f"the source holds {dup[0]!r} twice (e.g. per-expert and stacked); cannot convert")

    def key(item: tuple[int, OutTensor]) -> tuple[int, int, int]:
        i, t = item
        if t.name in rank:
            return rank[t.name], 0, i
        layer = layer_of(t.name)
        return last_in_layer.get(layer, len(rank)) if layer is not None else len(rank), 1, i

    return [t for _, t in sorted(enumerate(outs), key=key)]


def _out_config(config: dict[str, Any], cfg: MoGEConfig, keep: list[int], new_of: dict[int, int], dtype: str | None) -> dict[str, Any]:
    """config.json of the output: the source's dict with only the changed keys touched."""
    out = copy.deepcopy(config)
    if dtype:
        out["torch_dtype"] = dtype
    if keep != list(range(cfg.num_hidden_layers)):
        out["num_hidden_layers"] = len(keep)
        if "mlp_only_layers" in out or cfg.mlp_only_layers:
            out["mlp_only_layers"] = [new_of[i] for i in cfg.mlp_only_layers if i in new_of]
    return out


__all__ = ["Part", "OutTensor", "RankPlan", "Plan", "build_plan", "parse_layers", "ep_ranks", "DTYPES", "STACKED"]
