"""`inspect_checkpoint`: the report behind `moge load` (schema check, parameter counts, sizes), as a CheckpointReport."""

from __future__ import annotations

import fnmatch
import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from moge_cli.checkpoint import Checkpoint, open_checkpoint, resolve_location
from moge_cli.config import MODEL_TYPE, MoGEConfig
from moge_cli.dtypes import FLOAT_CODES as FLOAT_DTYPES
from moge_cli.ep import RankSummary, ep_info, is_ep_dir, local_expected, plan_problems, rank_summary, read_ep_plan
from moge_cli.errors import CheckpointError, UsageError
from moge_cli.memory_plan import MemoryPlan, plan_memory
from moge_cli.names import LAYOUTS, PER_EXPERT, PER_EXPERT_RE, STACKED, STACKED_RE, component_of, expected_tensors, skipped_notes
from moge_cli.problems import Problem
from moge_cli.quant_format import expected_quantized, read_quantization
from moge_cli.safetensors_format import TORCH_NAMES


@dataclass
class QuantizationSummary:
    """What a quantized checkpoint (`moge quantize` output, compressed-tensors) holds: settings and bytes."""

    format: str | None  # quantization_config.format, e.g. "pack-quantized"
    method: str  # rtn | mse, or another tool's name
    calibration: dict[str, Any] | None  # --calib: file, tokens, modules, experts, experts_reached; None without
    bits: int | None
    group_size: int | None  # None: one scale per output channel
    symmetric: bool | None
    schemes: dict[str, int]  # scheme label (int4-g128-asym...) -> quantized weights
    tensors: int  # quantized weights
    components: dict[str, int]  # component -> quantized weights
    quantized_params: int  # float weights they replace
    quantized_bytes: int  # packed ints + scales + zero points
    float_bytes: int  # every other tensor
    bits_per_quantized_weight: float  # 8 * quantized_bytes / quantized_params

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VerifySummary:
    """The streamed check of `moge load --verify`: values counted over every tensor, hashes of every shard."""

    files: dict[str, dict[str, Any]]  # shard (relative path) -> {"sha256", "bytes"}
    tensors_checked: int
    nan: int
    inf: int
    all_zero_tensors: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CheckpointReport:
    """What `moge load` reports about a checkpoint (the config, counts, sizes, problems); `to_dict()` is its --json."""

    path: str
    model_type: str
    layout: str  # per-expert | stacked | mixed | ...
    dtype: str  # torch name of the floating dtype holding most bytes; "" for none
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_experts: int
    num_experts_per_tok: int
    num_groups: int
    experts_per_group: int
    picks_per_group: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    dense_layers: list[int]
    params: dict[str, int]  # total, active, one per COMPONENTS, active_routed_experts (count_params)
    num_tensors: int
    size_bytes: int  # files on disk
    tensor_bytes: int  # tensor data
    shards: list[str]  # file names (rank-i/name for a split)
    problems: list[Problem]
    notes: list[str]
    skipped_tensors: list[str]  # known buffers a load skips
    ep: RankSummary | None = None  # one rank directory of `convert --ep`
    quantization: QuantizationSummary | None = None  # a quantized checkpoint
    tensors: list[dict[str, Any]] | None = None  # tensors=GLOB: rows of name, dtype, shape, shard, bytes
    verify: VerifySummary | None = None  # verify=True
    ep_plan: dict[str, Any] | None = None  # the top of a split: world_size, ranks [{rank, path, groups, experts}]
    memory_plan: MemoryPlan | None = None  # device=: will it fit (weights at the loaded dtype + KV cache + ...)

    def to_dict(self) -> dict[str, Any]:
        """The --json object: the sections that are None are left out."""
        d = {k: v for k, v in asdict(self).items() if v is not None or k not in SECTIONS}
        if self.memory_plan is not None:
            d["memory_plan"] = self.memory_plan.to_dict()  # with its derived figures (needed_bytes, fits)
        return d


SECTIONS = ("ep", "quantization", "tensors", "verify", "ep_plan", "memory_plan")  # CheckpointReport fields absent from --json when None


COMPONENTS = ("embeddings", "attention", "router", "routed_experts", "shared_experts", "dense_mlp", "norms", "lm_head")


def count_params(cfg: MoGEConfig) -> dict[str, int]:
    """Parameters of the model `cfg` describes: total, active (picked experts only), and per component.

    A tied lm_head (tie_word_embeddings) is the embedding matrix: counted once, under embeddings (lm_head 0)."""
    by_component = Counter()
    for name, shape in expected_tensors(cfg, STACKED).items():  # same counts as per-expert, far fewer names
        by_component[component_of(name)] += math.prod(shape)
    routed = by_component["routed_experts"]
    active_routed = routed * cfg.num_experts_per_tok // cfg.num_experts if cfg.num_experts else 0
    total = sum(by_component.values())
    params = {"total": total, "active": total - routed + active_routed}
    params.update({c: by_component[c] for c in COMPONENTS})
    params["active_routed_experts"] = active_routed
    return params


def schema_problems(ckpt: Checkpoint, dtype: str | None = None) -> list[Problem]:
    """Missing, unexpected and wrongly shaped tensors against the config; mixed dtypes; index drift."""
    layout = ckpt.layout
    problems: list[Problem] = []
    if ckpt.config.model_type != MODEL_TYPE:
        problems.append(Problem("config", "", f"model_type is {ckpt.config.model_type!r}, expected {MODEL_TYPE!r}"))
    if layout not in LAYOUTS and (layout == "mixed" or ckpt.config.moe_layers):  # no MoE layer: no expert tensor to lay out
        problems.append(Problem("layout", "", f"layout is {layout}: expected all expert tensors per-expert or all stacked"))
    expected = expected_tensors(ckpt.config, layout if layout in LAYOUTS else PER_EXPERT)
    if layout == "mixed":  # judge each layer by its own expert tensors rather than report everything twice
        expected.update(expected_tensors(ckpt.config, STACKED))
        expected = {n: s for n, s in expected.items() if n in ckpt.tensors or not (PER_EXPERT_RE.match(n) or STACKED_RE.match(n))}
    if (ep := ep_info(ckpt.config)) is not None:  # a rank of `convert --ep`: its own experts, by local id
        expected = local_expected(expected, len(ep["experts"]))
    try:
        quant = read_quantization(ckpt.config.extra, {n: t.shape for n, t in ckpt.tensors.items()})
    except CheckpointError as e:
        problems.append(Problem("config", "", str(e)))
        quant = None
    if quant is not None:  # `moge quantize` output: each quantized weight is stored as packed ints + scales
        expected = expected_quantized(expected, quant.modules)
    for name, shape in expected.items():
        info = ckpt.tensors.get(name)
        if info is None:
            problems.append(Problem("missing", name, f"expected shape {list(shape)}"))
        elif info.shape != shape:
            problems.append(Problem("shape", name, f"shape {list(info.shape)}, config says {list(shape)}"))
    skipped = set(skipped_notes([n for n in ckpt.tensors if n not in expected], ckpt.config)[0])
    for name in ckpt.tensors:
        if name not in expected and name not in skipped:
            problems.append(Problem("unexpected", name, f"not part of a {ckpt.config.model_type} checkpoint of this config"))
    dtype = dtype or main_dtype(ckpt)
    for name, info in ckpt.tensors.items():
        if info.dtype in FLOAT_DTYPES and info.dtype != dtype and name not in skipped:  # buffers are often float32
            problems.append(Problem("dtype", name, f"{TORCH_NAMES[info.dtype]} in a {TORCH_NAMES.get(dtype, dtype)} checkpoint"))
    for name in ckpt.unindexed:
        problems.append(Problem("index", name, "stored in a shard but missing from the index"))
    if ckpt.index_total_size is not None:
        total = sum(t.nbytes for t in ckpt.tensors.values())
        if total != ckpt.index_total_size:
            problems.append(Problem("index", "", f"index metadata.total_size is {ckpt.index_total_size}, tensors add up to {total}"))
    return problems


def main_dtype(ckpt: Checkpoint) -> str:
    """The floating dtype holding most bytes (safetensors code), or '' for none."""
    by_bytes = Counter()
    for t in ckpt.tensors.values():
        if t.dtype in FLOAT_DTYPES:
            by_bytes[t.dtype] += t.nbytes
    return by_bytes.most_common(1)[0][0] if by_bytes else ""


def inspect_checkpoint(
    path: str | os.PathLike,
    *,
    revision: str | None = None,
    verify: bool = False,
    manifest: str | os.PathLike | None = None,
    check: str | os.PathLike | None = None,
    tensors: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CheckpointReport:
    """Inspect a checkpoint; the report's to_dict() is what `moge load --json` prints.

    verify: stream every tensor (NaN/Inf, all-zero) and hash every shard; manifest: write those
    hashes to this file; check: compare shard hashes against a manifest written earlier;
    tensors: a glob; matching tensors are listed in report.tensors.
    device: also plan the memory of loading it there at `dtype` (None: the loader's) and generating with the
    default context (report.memory_plan; from headers, nothing loads).
    progress(n_bytes, total_bytes) is called as bytes are streamed. Raises MogeError if unreadable.
    """
    path = resolve_location(path, revision)  # a local path, or a repo id's snapshot in the Hugging Face cache
    if is_ep_dir(path):  # the top of a `convert --ep` split: every rank plus the plan
        if manifest or check:
            raise UsageError(f"{path}: manifests are per checkpoint; pass one rank directory ({path}/rank-0)")
        if device is not None:
            raise UsageError(f"{path}: --device plans one process's memory; plan the merged checkpoint, or one rank directory")
        return inspect_split(Path(path), verify=verify, tensors=tensors, progress=progress)
    ckpt = open_checkpoint(path)
    try:
        report = summarize(ckpt)
        if device is not None:
            report.memory_plan = plan_memory(ckpt, device=device, dtype=dtype)
        if tensors is not None:
            report.tensors = tensor_rows(ckpt, tensors)
        if verify or manifest or check:
            from moge_cli.shard_scan import check_manifest, verify_checkpoint, write_manifest

            result = verify_checkpoint(ckpt, progress=progress)
            report.verify = VerifySummary(**result.summary())
            report.problems += result.problems
            if manifest:
                write_manifest(result, Path(manifest))
            if check:
                report.problems += check_manifest(result, Path(check))
        return report
    finally:
        ckpt.close()


def tensor_rows(ckpt: Checkpoint, pattern: str = "*") -> list[dict[str, Any]]:
    return [
        {"name": t.name, "dtype": TORCH_NAMES[t.dtype], "shape": list(t.shape), "shard": t.file.name, "bytes": t.nbytes}
        for t in ckpt.tensors.values()
        if fnmatch.fnmatchcase(t.name, pattern)
    ]


def load_notes(ckpt: Checkpoint) -> tuple[list[str], list[str]]:
    """(tensors a load skips, notes for the reader): known buffers outside the model, tied embeddings, rope_scaling."""
    cfg = ckpt.config
    layout = ckpt.layout if ckpt.layout in LAYOUTS else PER_EXPERT
    expected = set(expected_tensors(cfg, layout)) | set(expected_tensors(cfg, STACKED))
    skipped, notes = skipped_notes([n for n in ckpt.tensors if n not in expected], cfg)
    if cfg.tie_word_embeddings:
        notes.insert(0, "tie_word_embeddings: the output projection (lm_head) is the embedding matrix")
    if (r := cfg.rope) is not None:
        notes.insert(0, f"rope_scaling: {r.rope_type}, factor {r.factor:g}")
    return skipped, notes


def summarize(ckpt: Checkpoint) -> CheckpointReport:
    """The report of one checkpoint from its headers and config (no tensor data read)."""
    cfg = ckpt.config
    dtype = main_dtype(ckpt)
    skipped, notes = load_notes(ckpt)
    ep = ep_info(cfg)
    return CheckpointReport(
        path=str(ckpt.source),
        model_type=cfg.model_type,
        layout=ckpt.layout,
        dtype=TORCH_NAMES.get(dtype, dtype),
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        num_groups=cfg.n_groups,
        experts_per_group=cfg.experts_per_group,
        picks_per_group=cfg.picks_per_group,
        moe_intermediate_size=cfg.moe_intermediate_size,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
        dense_layers=cfg.dense_layers,
        params=count_params(cfg),
        num_tensors=len(ckpt.tensors),
        size_bytes=ckpt.size_bytes,
        tensor_bytes=sum(t.nbytes for t in ckpt.tensors.values()),
        shards=[f.name for f in ckpt.files],
        problems=schema_problems(ckpt, dtype),
        notes=notes,
        skipped_tensors=skipped,
        ep=rank_summary(cfg, ep, Path(ckpt.source).parent) if ep else None,
        quantization=quantization_summary(ckpt),
    )


def quantization_summary(ckpt: Checkpoint) -> QuantizationSummary | None:
    """Bits, group size, method and which tensors of a quantized checkpoint, with its bytes; None if not quantized."""
    try:
        quant = read_quantization(ckpt.config.extra, {n: t.shape for n, t in ckpt.tensors.items()})
    except CheckpointError:
        return None  # reported as a problem by schema_problems
    if quant is None:
        return None
    schemes = Counter(s.label for s in quant.modules.values())
    components = Counter(component_of(m + ".weight") for m in quant.modules)
    quantized_bytes = sum(t.nbytes for n, t in ckpt.tensors.items() if n.rsplit(".", 1)[0] in quant.modules and ".weight_" in n)
    float_shapes = expected_tensors(ckpt.config, PER_EXPERT)  # what each quantized weight was
    quantized_params = sum(math.prod(float_shapes.get(m + ".weight", (0,))) for m in quant.modules)
    first = next(iter(quant.modules.values()), None)
    return QuantizationSummary(
        format=quant.config.get("format"),
        method=quant.method,
        calibration=quant.moge.get("calibration"),
        bits=quant.moge.get("bits", first.bits if first else None),
        group_size=quant.moge.get("group_size", first.group_size if first else None),
        symmetric=quant.moge.get("symmetric", first.symmetric if first else None),
        schemes=dict(schemes),
        tensors=len(quant.modules),
        components=dict(components),
        quantized_params=quantized_params,
        quantized_bytes=quantized_bytes,
        float_bytes=sum(t.nbytes for t in ckpt.tensors.values()) - quantized_bytes,
        bits_per_quantized_weight=8 * quantized_bytes / quantized_params if quantized_params else 0.0,
    )


def inspect_split(root: Path, **options: Any) -> CheckpointReport:
    """The report of a `convert --ep` split: rank 0's, with totals over ranks, every rank's problems and the plan's checks."""
    plan = read_ep_plan(root)
    ranks = plan["ranks"]  # [{rank, path, groups, experts}]
    reports = [inspect_checkpoint(root / r["path"], **options) for r in ranks]
    eps = [{"rank": r.ep.rank, "world_size": r.ep.world_size, "experts": r.ep.experts} if r.ep else None for r in reports]
    problems = [Problem("ep", tensor, detail) for tensor, detail in plan_problems(plan, eps)]
    problems += [replace(p, tensor=f"{e['path']}/{p.tensor}") for e, r in zip(ranks, reports) for p in r.problems]
    first = reports[0]
    return replace(
        first,
        path=str(root),
        problems=problems,
        num_tensors=sum(r.num_tensors for r in reports),
        size_bytes=sum(r.size_bytes for r in reports),
        tensor_bytes=sum(r.tensor_bytes for r in reports),
        shards=[f"{e['path']}/{s}" for e, r in zip(ranks, reports) for s in r.shards],
        ep=None,
        tensors=None if first.tensors is None else [{**t, "shard": f"{e['path']}/{t['shard']}"} for e, r in zip(ranks, reports) for t in r.tensors],
        verify=None if first.verify is None else VerifySummary(
            files={f"{e['path']}/{f}": h for e, r in zip(ranks, reports) for f, h in r.verify.files.items()},
            **{k: sum(getattr(r.verify, k) for r in reports) for k in ("tensors_checked", "nan", "inf", "all_zero_tensors")},
        ),
        ep_plan={
            "world_size": plan["world_size"],
            "ranks": [{"rank": e["rank"], "path": e["path"], "groups": e.get("groups"), "experts": e["experts"]} for e in ranks],
        },
    )
