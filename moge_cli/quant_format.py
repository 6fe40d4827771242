"""The compressed-tensors "pack-quantized" checkpoint format as moge writes and reads it (torch only to pack and unpack).

A quantized module X (e.g. model.layers.0.mlp.experts.3.down_proj) stores, instead of X.weight [N, K]
(the names: moge_cli/names.py QUANT_SUFFIXES, as PACKED, SCALE, SHAPE, ZERO_POINT):
    X.weight_packed      int32 [N, ceil(K*b/32)]   b-bit integers + 2^(b-1), 32/b per word, low bits first
    X.weight_scale       float [N, G]              G = 1 (strategy channel) or K / group_size (group)
    X.weight_shape       int64 [2]                 [N, K]
    X.weight_zero_point  int32 [ceil(N*b/32), G]   asymmetric only: signed zero points packed along dim 0
config.json gets `quantization_config` (quant_method compressed-tensors, format pack-quantized,
config_groups with targets, ignore) and moge's own `moge_quantization` (method, what was quantized).
Which scheme a module has is told by matching its name against the config groups' targets, as
vLLM does: an exact name first, then "re:" regular expressions, then a class name (Linear, Embedding).
Packing (compressed-tensors `pack_to_int32`): q + 2^(b-1) as an unsigned b-bit value, 32/b values per
int32 along the packed dim, value j of a word in bits b*j .. b*j+b-1. pack_int32 / unpack_int32 import
torch when called; reading the format (`moge load`) does not.

Reading: `quantization_of` (is a checkpoint quantized, and how: a QuantizedCheckpoint), `read_module` (one
module's stored tensors as integers, scales and zero points). The loader (moge_cli/loader.py) builds the
compute objects from them (moge_kernels.qlinear.QLinear); converters/quantize*.py write the format.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moge_cli.errors import CheckpointError
from moge_cli.files import optional_file
from moge_cli.names import KINDS, PACKED, SCALE, SHAPE, ZERO_POINT, kind_of_name, module_of, numbered, quant_name

if TYPE_CHECKING:
    import torch

BITS = (4, 8)  # integer widths moge writes and reads
QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
MOGE_KEY = "moge_quantization"
EMBEDDING = KINDS["embed"].module  # the module the class name "Embedding" targets; every other 2-D weight is a "Linear"
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
        out = {PACKED: (n, packed_cols(k, self.bits)), SCALE: (n, g), SHAPE: (2,)}
        if not self.symmetric:
            out[ZERO_POINT] = (packed_cols(n, self.bits), g)
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


def kind_of(module: str) -> str:
    """A regex matching every module of the same kind: its template in the vocabulary with {L} and {e} as \\d+
    (a module outside the vocabulary: every dotted number as \\d+)."""
    kind = kind_of_name(module + ".weight")
    template = module_of(KINDS[kind].template) if kind else _NUM_RE.sub(".{L}.", module)
    return "^" + numbered(template, r"\d+") + "$"


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
    """What a quantized checkpoint holds: module -> scheme (for every module with a PACKED tensor), and settings."""

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
    packed = [n.removesuffix("." + PACKED) for n in shapes if n.endswith("." + PACKED)]
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
            raise CheckpointError(f"{quant_name(m, PACKED)}: no quantization_config group targets this module")
        if s.bits not in BITS:
            raise CheckpointError(f"{m}: {s.bits}-bit weights are not supported (4 or 8)")
        shape_t = shapes.get(quant_name(m, SHAPE))
        if shape_t != (2,):
            raise CheckpointError(f"{quant_name(m, SHAPE)}: expected an int tensor of 2 values, found {shape_t}")
        modules[m] = s
    moge = config.get(MOGE_KEY) if isinstance(config.get(MOGE_KEY), dict) else {}
    return QuantizedCheckpoint(modules, qc, moge)


def quantization_of(ckpt) -> QuantizedCheckpoint | None:
    """The quantization of an open Checkpoint (its config.json and tensor names), or None if it has none."""
    path = optional_file(ckpt.root, "config.json")  # checked by moge_cli.files when the checkpoint opened; again, as read
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path is not None else dict(ckpt.config.extra)
    except (OSError, ValueError):
        config = dict(ckpt.config.extra)
    return read_quantization(config, {n: i.shape for n, i in ckpt.tensors.items()})


def read_module(ckpt, module: str, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q int8 [N, K], scale [N, G], zero int8 [N, G] or None) of a stored module of an open Checkpoint."""
    n, k = (int(v) for v in ckpt.tensor(quant_name(module, SHAPE)).tolist())
    q = unpack_int32(ckpt.tensor(quant_name(module, PACKED)), scheme.bits, (n, k))
    scale = ckpt.tensor(quant_name(module, SCALE)).clone()
    if scale.shape[0] != n or k % scale.shape[1]:
        raise CheckpointError(f"{quant_name(module, SCALE)}: shape {list(scale.shape)} does not fit {SHAPE} {[n, k]}")
    zero = None
    if not scheme.symmetric:
        zero = unpack_int32(ckpt.tensor(quant_name(module, ZERO_POINT)), scheme.bits, (n, scale.shape[1]), dim=0)  # packed along rows
    return q, scale, zero


def expected_quantized(expected: dict[str, tuple[int, ...]], modules: dict[str, Scheme]) -> dict[str, tuple[int, ...]]:
    """expected_tensors of a float checkpoint with each quantized module's weight replaced by its stored tensors."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in expected.items():
        m = module_of(name)
        if name.endswith(".weight") and m in modules and len(shape) == 2:
            out.update({quant_name(m, suffix): v for suffix, v in modules[m].tensor_shapes(*shape).items()})
        else:
            out[name] = shape
    return out


# ---- packing -----------------------------------------------------------------------------------
def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Signed b-bit integers q [R, C] (int8) -> int32, 32/b per word along `dim` (compressed-tensors order)."""
    import torch

    if bits not in BITS:
        raise ValueError(f"packing supports {BITS} bits, got {bits}")
    if dim == 0:
        return pack_int32(q.t(), bits, 1).t().contiguous()
    rows, cols = q.shape
    if sys.byteorder == "little":  # the words' bytes in memory order are the packed bytes: build them directly
        if bits == 8:
            b = q.contiguous().view(torch.uint8) ^ 0x80  # + 128 as a byte: offset binary
        else:
            u = (q.contiguous().view(torch.uint8) + 8) & 0xF  # + 8, as 4 bits
            if cols % 2:
                u = torch.nn.functional.pad(u, (0, 1))
            b = u[:, 0::2] | (u[:, 1::2] << 4)  # value 2j in the low half of byte j
        pad = -b.shape[1] % 4
        if pad:
            b = torch.nn.functional.pad(b, (0, pad))
        words = b.contiguous().view(-1).view(torch.int32).view(rows, -1)  # via 1-D: a [1, C] view may have any row stride
        return words[:, : packed_cols(cols, bits)].contiguous()
    per = 32 // bits
    u = q.to(torch.int64) + (1 << (bits - 1))  # unsigned
    pad = -cols % per
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(rows, -1, per)  # [R, words, per]
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    word = (u << shifts).sum(-1)  # < 2^32: the bit fields do not overlap
    word = torch.where(word >= 1 << 31, word - (1 << 32), word)  # two's complement int32
    return word.to(torch.int32).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, shape: tuple[int, int], dim: int = 1) -> torch.Tensor:
    """Inverse of pack_int32: int32 words -> signed int8 [shape]."""
    import torch

    if dim == 0:
        return unpack_int32(packed.t(), bits, (shape[1], shape[0]), 1).t().contiguous()
    rows, cols = shape
    if sys.byteorder == "little":
        b = packed.contiguous().view(-1).view(torch.uint8).view(rows, -1)  # [R, 4 * words]
        if bits == 8:
            return (b[:, :cols] ^ 0x80).view(torch.int8)
        u = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(rows, -1)[:, :cols]
        return u.view(torch.int8) - 8
    shifts = torch.arange(0, 32, bits, dtype=torch.int64)
    u = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, words, per]
    u = u.reshape(rows, -1)[:, :cols]
    return (u - (1 << (bits - 1))).to(torch.int8)


def packed_cols(cols: int, bits: int) -> int:
    """int32 words holding `cols` b-bit values."""
    return math.ceil(cols * bits / 32)
