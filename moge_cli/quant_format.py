"""The compressed-tensors "pack-quantized" checkpoint format as moge writes and reads it (no torch).

A quantized module X (e.g. model.layers.0.mlp.experts.3.down_proj) stores, instead of X.weight [N, K]:
    X.weight_packed      int32 [N, ceil(K*b/32)]   b-bit integers + 2^(b-1), 32/b per word, low bits first
    X.weight_scale       float [N, G]              G = 1 (strategy channel) or K / group_size (group)
    X.weight_shape       int64 [2]                 [N, K]
    X.weight_zero_point  int32 [ceil(N*b/32), G]   asymmetric only: signed zero points packed along dim 0
config.json gets `quantization_config` (quant_method compressed-tensors, format pack-quantized,
config_groups with targets, ignore) and moge's own `moge_quantization` (method, what was quantized).
Which scheme a module has is told by matching its name against the config groups' targets, as
vLLM does: an exact name first, then "re:" regular expressions, then a class name (Linear, Embedding).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from moge_cli.errors import CheckpointError

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
MOGE_KEY = "moge_quantization"
EMBEDDING = "model.embed_tokens"
_NUM_RE = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Scheme:
    """Weight quantization of one module: bits, group size (None: one scale per output channel), symmetry, method."""

    bits: int
    group_size: int | None
    symmetric: bool
    method: str = "rtn"

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def strategy(self) -> str:
        return "channel" if self.group_size is None else "group"

    def groups(self, k: int) -> int:
        return 1 if self.group_size is None else k // self.group_size

    def tensor_shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        """Suffix -> shape of the stored tensors of an [n, k] weight."""
        g = self.groups(k)
        out = {"weight_packed": (n, math.ceil(k * self.bits / 32)), "weight_scale": (n, g), "weight_shape": (2,)}
        if not self.symmetric:
            out["weight_zero_point"] = (math.ceil(n * self.bits / 32), g)
        return out

    @property
    def label(self) -> str:
        g = "channel" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits} {g} {'sym' if self.symmetric else 'asym'}"

    def weights_args(self) -> dict[str, Any]:
        """The compressed-tensors QuantizationArgs of the weights, as JSON."""
        return {
            "num_bits": self.bits, "type": "int", "symmetric": self.symmetric, "strategy": self.strategy,
            "group_size": self.group_size, "block_structure": None, "dynamic": False, "actorder": None,
            "observer": "mse" if self.method == "mse" else "minmax", "observer_kwargs": {},
        }  # fmt: skip


def module_of(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


def kind_of(module: str) -> str:
    """A regex matching every module of the same kind: layer and expert numbers become \\d+."""
    parts = _NUM_RE.split(module)
    out = []
    for i, p in enumerate(parts):
        out.append(r"\.\d+\." if i % 2 else re.escape(p))
    return "^" + "".join(out) + "$"


def _compact(modules: list[str], universe: dict[str, list[str]]) -> list[str]:
    """modules as "re:" patterns for whole kinds (every module of the kind is listed), exact names otherwise."""
    chosen = set(modules)
    by_kind: dict[str, list[str]] = {}
    for m in modules:
        by_kind.setdefault(kind_of(m), []).append(m)
    out = []
    for kind, ms in by_kind.items():
        if len(ms) > 1 and all(x in chosen for x in universe.get(kind, [])):
            out.append("re:" + kind)
        else:
            out.extend(ms)
    return out


def quantization_config(schemes: dict[str, Scheme], linear: list[str]) -> dict[str, Any]:
    """config.json's quantization_config for `schemes` (module -> scheme); `linear`: every 2-D weight module.

    The most common scheme targets "Linear" (and "Embedding" if the embeddings are quantized with it);
    other schemes target their modules by name or pattern; 2-D modules left in float are ignored.
    """
    universe: dict[str, list[str]] = {}
    for m in linear:
        universe.setdefault(kind_of(m), []).append(m)
    counts: dict[Scheme, int] = {}
    for s in schemes.values():
        counts[s] = counts.get(s, 0) + 1
    order = sorted(counts, key=lambda s: -counts[s])
    groups: dict[str, Any] = {}
    for i, s in enumerate(order):
        mods = [m for m, x in schemes.items() if x == s]
        if i == 0:
            targets = ["Linear"] + (["Embedding"] if EMBEDDING in mods else [])
        else:
            targets = _compact(mods, universe)
        groups[f"group_{i}"] = {
            "targets": targets, "weights": s.weights_args(), "input_activations": None,
            "output_activations": None, "format": FORMAT,
        }  # fmt: skip
    ignore = _compact([m for m in linear if m not in schemes and m != EMBEDDING], universe)
    return {
        "quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
        "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
        "sparsity_config": {}, "transform_config": {},
    }  # fmt: skip


def _matches(target: str, module: str) -> int:
    """Match strength of one target: 3 exact name, 2 regex, 1 class name, 0 none."""
    if target == module:
        return 3
    if target.startswith("re:"):
        return 2 if re.match(target[3:], module) else 0
    if target == "Linear":
        return 1 if module != EMBEDDING else 0
    if target == "Embedding":
        return 1 if module == EMBEDDING else 0
    return 0


def scheme_of(module: str, qconfig: dict[str, Any]) -> Scheme | None:
    """The scheme of `module` under a quantization_config, or None when no group targets it (or it is ignored)."""
    for pat in qconfig.get("ignore") or []:
        if _matches(pat, module) >= 2:
            return None
    best, found = 0, None
    for group in (qconfig.get("config_groups") or {}).values():
        w = group.get("weights") if isinstance(group, dict) else None
        if not w:
            continue
        strength = max((_matches(t, module) for t in group.get("targets", [])), default=0)
        if strength > best:
            best = strength
            found = Scheme(int(w["num_bits"]), w.get("group_size") if w.get("strategy") == "group" else None, bool(w.get("symmetric", True)))
    return found


@dataclass
class QuantizedCheckpoint:
    """What a quantized checkpoint holds: module -> scheme (for every module with a weight_packed), and settings."""

    modules: dict[str, Scheme]
    config: dict[str, Any]  # quantization_config
    moge: dict[str, Any]  # moge_quantization ({} for checkpoints written by other tools)

    @property
    def method(self) -> str:
        return self.moge.get("method", "unknown")


def read_quantization(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> QuantizedCheckpoint | None:
    """The quantization of a checkpoint (config.json dict, tensor name -> shape), or None if it has none.

    Raises CheckpointError for a format moge cannot read (not pack-quantized, a packed module no
    config group targets, shapes that disagree with the scheme).
    """
    qc = config.get("quantization_config")
    packed = [n.removesuffix(".weight_packed") for n in shapes if n.endswith(".weight_packed")]
    if not qc and not packed:
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"quantization_config: quant_method {qc.get('quant_method') if isinstance(qc, dict) else qc!r} is not supported; moge reads {QUANT_METHOD}")
    if qc.get("format") != FORMAT:
        raise CheckpointError(f"quantization_config: format {qc.get('format')!r} is not supported; moge reads {FORMAT}")
    modules: dict[str, Scheme] = {}
    for m in packed:
        s = scheme_of(m, qc)
        if s is None:
            raise CheckpointError(f"{m}.weight_packed: no quantization_config group targets this module")
        if s.bits not in (4, 8):
            raise CheckpointError(f"{m}: {s.bits}-bit weights are not supported (4 or 8)")
        shape_t = shapes.get(f"{m}.weight_shape")
        if shape_t != (2,):
            raise CheckpointError(f"{m}.weight_shape: expected an int tensor of 2 values, found {shape_t}")
        modules[m] = s
    moge = config.get(MOGE_KEY) if isinstance(config.get(MOGE_KEY), dict) else {}
    return QuantizedCheckpoint(modules, qc, moge)


def expected_quantized(expected: dict[str, tuple[int, ...]], modules: dict[str, Scheme]) -> dict[str, tuple[int, ...]]:
    """expected_tensors of a float checkpoint with each quantized module's weight replaced by its stored tensors."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in expected.items():
        m = module_of(name)
        if name.endswith(".weight") and m in modules and len(shape) == 2:
            out.update({f"{m}.{k}": v for k, v in modules[m].tensor_shapes(*shape).items()})
        else:
            out[name] = shape
    return out
