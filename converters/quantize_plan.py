"""quantize's plan: convert's per-expert plan, with every selected weight replaced by its quantized tensors.

The float plan comes from `build_plan(layout="per-expert")`, so stacked inputs are split into 2-D
expert weights by the same recipes convert uses. Each selected OutTensor X.weight then becomes
QuantOut specs (X.weight_packed, _scale, _shape and, asymmetric, _zero_point: names.QUANT_SUFFIXES) that
share its recipe; the streaming writer writes them like any other tensor, in that order.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from dataclasses import dataclass
from typing import Any

from moge_cli.errors import UsageError
from moge_cli.names import KINDS, PER_EXPERT, SCALE, SHAPE, component_of, kind_of_name, module_of
from moge_cli.quant_format import BITS, EMBEDDING, MOGE_KEY, Scheme, quantization_config
from moge_cli.safetensors_format import DTYPE_SIZES, TensorInfo

from moge_converters.plan import OutTensor, Plan, build_plan
from moge_converters.quantize import GROUP_SIZES, METHODS

DEFAULT_COMPONENTS = ("attention", "routed_experts", "shared_experts", "dense_mlp")  # of the quantizable kinds (names.KINDS)
SCALE_CODES = {"BF16": "BF16", "F16": "F16", "F32": "F32", "F64": "F32"}  # weight dtype -> scale dtype
MIN_GROUP = 32


@dataclass(frozen=True)
class QuantOut:
    """One stored tensor of a quantized module: `role` (one of names.QUANT_SUFFIXES) of the weight `base`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    role: str
    base: OutTensor  # the float weight's recipe (its parts are read to quantize it)
    scheme: Scheme

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    @property
    def module(self) -> str:
        return module_of(self.base.name)

    # What convert's describe / estimated_peak read from an OutTensor: no cast, the weight's parts.
    cast = False

    @property
    def parts(self):
        return self.base.parts

    @property
    def src_dtype(self) -> str:
        return self.base.src_dtype

    def recipe(self) -> str:
        return f"{self.role.removeprefix('weight_')} of {self.scheme.label} {self.scheme.method}({self.base.recipe()})"


@dataclass(frozen=True)
class QuantOptions:
    """The user's choices (`moge quantize` options)."""

    bits: int = 4
    group_size: int | None = None  # None: 128 for 4 bits; 8 bits is always per channel
    symmetric: bool | None = None  # None: symmetric for 8 bits, asymmetric for 4
    method: str = "rtn"
    embeddings: bool = False
    lm_head: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def scheme(self) -> Scheme:
        """The requested scheme, validated."""
        if self.bits not in BITS:
            raise UsageError(f"--bits {self.bits}: use 4 or 8")
        if self.method not in METHODS:
            raise UsageError(f"--method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.bits == 8:
            if self.group_size is not None:
                raise UsageError("--group-size applies to --bits 4; 8-bit weights get one scale per output channel")
            if self.symmetric is False:
                raise UsageError("--bits 8 is symmetric per output channel; drop --asymmetric")
            return Scheme(8, None, True, self.method)
        gs = 128 if self.group_size is None else self.group_size
        if gs not in GROUP_SIZES:
            raise UsageError(f"--group-size {gs}: use one of {', '.join(map(str, GROUP_SIZES))}")
        return Scheme(4, gs, bool(self.symmetric), self.method)


def selected(name: str, shape: tuple[int, ...], opts: QuantOptions) -> bool:
    """Whether the output tensor `name` is quantized under `opts`: a quantizable kind of the vocabulary (never the router,
    norms or biases: they decide routing or are tiny), of a component the options select, not excluded."""
    kind = kind_of_name(name)
    if kind is None or not KINDS[kind].quantizable or len(shape) != 2 or not name.endswith(".weight"):
        return False
    comp = KINDS[kind].component
    wanted = comp in DEFAULT_COMPONENTS or (comp == "embeddings" and opts.embeddings) or (comp == "lm_head" and opts.lm_head)
    if not wanted:
        return False
    names = (name, module_of(name))
    if opts.include and not any(fnmatch.fnmatchcase(n, g) for g in opts.include for n in names):
        return False
    return not any(fnmatch.fnmatchcase(n, g) for g in opts.exclude for n in names)


def fit_scheme(scheme: Scheme, k: int) -> Scheme:
    """The scheme for a weight with k input columns: the group size halved until it divides k
    (never below 32), else one scale per output channel."""
    gs = scheme.group_size
    if gs is None or k % gs == 0:
        return scheme
    while gs > MIN_GROUP and k % gs:
        gs //= 2
    return Scheme(scheme.bits, gs if k % gs == 0 else None, scheme.symmetric, scheme.method)


def build_quant_plan(tensors: dict[str, TensorInfo], config: dict[str, Any], opts: QuantOptions) -> tuple[Plan, dict[str, Scheme], list[str]]:
    """(plan, module -> scheme, notes) for quantizing a checkpoint (source headers, config.json dict)."""
    scheme = opts.scheme()
    if config.get("quantization_config"):
        raise UsageError("the source is already quantized (config.json has quantization_config); quantize the float checkpoint")
    if config.get("moge_ep"):
        raise UsageError("the source is one rank of an expert-parallel split; quantize the full checkpoint")
    plan = build_plan(tensors, config, layout=PER_EXPERT)
    rank = plan.ranks[0]
    schemes: dict[str, Scheme] = {}
    fallback: dict[tuple[int, str], int] = {}
    out: list[Any] = []
    for t in rank.tensors:
        if not selected(t.name, t.shape, opts) or t.src_dtype not in SCALE_CODES:
            out.append(t)
            continue
        n, k = t.shape
        s = fit_scheme(scheme, k)
        if s != scheme:
            key = (k, s.label)
            fallback[key] = fallback.get(key, 0) + 1
        schemes[module_of(t.name)] = s
        for role, shape in s.tensor_shapes(n, k).items():
            code = {SCALE: SCALE_CODES[t.src_dtype], SHAPE: "I64"}.get(role, "I32")
            out.append(QuantOut(f"{module_of(t.name)}.{role}", code, shape, role, t, s))
    if not schemes:
        raise UsageError("nothing to quantize: no tensor matches the selection (check --include / --exclude)")
    rank.tensors = out
    linear = [module_of(t.name) for t in plan.tensors if _linear_like(t)]
    linear += [m for m in schemes if m not in linear]
    rank.config = copy.deepcopy(rank.config)
    rank.config["quantization_config"] = quantization_config(schemes, linear)
    rank.config[MOGE_KEY] = {
        "method": scheme.method, "bits": scheme.bits, "group_size": scheme.group_size, "symmetric": scheme.symmetric,
        "tensors": len(schemes), "components": _component_counts(schemes),
    }  # fmt: skip
    notes = [
        f"{c} weight(s) with {k} input columns use {label} ({scheme.group_size} does not divide {k})"
        for (k, label), c in sorted(fallback.items())
    ]
    if opts.lm_head and config.get("tie_word_embeddings") and not any(component_of(m + ".weight") == "lm_head" for m in schemes):
        notes.append("--lm-head: tie_word_embeddings, so there is no lm_head weight to quantize: the output projection is the "
                     "embedding matrix (--embeddings quantizes its storage; moge dequantises it once at load)")  # fmt: skip
    return plan, schemes, notes


def _linear_like(t) -> bool:
    """A float 2-D weight of a module (a Linear, or the embedding table): what `ignore` may name."""
    return isinstance(t, OutTensor) and t.name.endswith(".weight") and len(t.shape) == 2 and module_of(t.name) != EMBEDDING


def _component_counts(schemes: dict[str, Scheme]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in schemes:
        c = component_of(m + ".weight")
        counts[c] = counts.get(c, 0) + 1
    return counts
