"""`quantize_checkpoint()`: convert's streaming pipeline with a quantizing emitter, plus the quality report.

Plan (quantize_plan) -> shards (plan_shards) -> staging dir -> write_shards with QuantEmitter ->
optional --verify -> rename; returns a QuantizeResult (a QuantizeDryRun with dry_run). Float tensors go through convert's Emitter (sendfile copies); a
quantized module is read from the memory-mapped source in row blocks of ROW_BLOCK_ELEMS, so memory
holds one block plus the module's scales and zero points, whatever the model size.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from moge_cli.checkpoint import open_checkpoint, resolve_location
from moge_cli.errors import UsageError
from moge_cli.names import PACKED, SCALE, SHAPE, ZERO_POINT, component_of
from moge_cli.quant_format import pack_int32

from moge_converters.calibrate import calibrate
from moge_converters.cast import byte_view, torch_dtype
from moge_converters.convert import DryRunPlan, Emitter, PeakRss, describe, output_entries, prepare, start_writing
from moge_converters.quantize import dequantize, error_sums, error_stats, quantize
from moge_converters.quantize_plan import SCALE_CODES, QuantOptions, QuantOut, build_quant_plan
from moge_converters.shards import ShardFile, parse_size, staging_dir, write_shards
from moge_converters.sources import open_source
from moge_converters.verify import VerifyError, same_bytes, tensor_matches

ROW_BLOCK_ELEMS = 1 << 20  # weight elements quantized at a time
COMPONENT_ORDER = ("attention", "routed_experts", "shared_experts", "dense_mlp", "embeddings", "lm_head")


@dataclass
class QuantSettings:
    """How the weights were quantized: config.json's `moge_quantization` block."""

    method: str  # rtn | mse
    bits: int  # 4 | 8
    group_size: int | None  # None: one scale per output channel (8 bits)
    symmetric: bool
    tensors: int  # quantized weights
    components: dict[str, int]  # component -> quantized weights
    calibration: dict[str, Any] | None = None  # --calib: file, tokens, modules, experts, experts_reached

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.calibration is None:  # absent, as in config.json
            del d["calibration"]
        return d


@dataclass
class QualityReport:
    """Reconstruction error of the quantized weights: per tensor, per component, over all of them."""

    tensors: list[dict[str, Any]]  # per weight: tensor, component, scheme, numel, calibrated, rel_error, sqnr_db
    components: dict[str, dict[str, Any]]  # component -> tensors, rel_error, sqnr_db (pooled), mean_sqnr_db, min_sqnr_db
    overall: dict[str, float]  # rel_error, sqnr_db pooled over every quantized weight

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalResult:
    """Perplexity of the source and of the quantized checkpoint on one text (`--perplexity`)."""

    text: str  # the file
    tokens: int
    before: float
    window: int  # tokens per scored window
    stride: int
    after: float
    change: float  # after / before - 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QuantizeResult:
    """What `quantize_checkpoint()` wrote: settings, sizes, time, memory, error report; `to_dict()` is its --json."""

    source: str
    destination: str
    quantization: QuantSettings
    tensors: int  # tensors written
    quantized_tensors: int
    bytes_in: int
    bytes_out: int
    seconds: float
    peak_rss_bytes: int
    outputs: list[dict[str, Any]]  # [{"file", "bytes"}]
    quality: QualityReport
    verified: bool
    notes: list[str]
    eval: EvalResult | None = None  # eval_text given

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["quantization"] = self.quantization.to_dict()
        if self.eval is None:
            del d["eval"]
        return d


@dataclass
class QuantizeDryRun(DryRunPlan):
    """The --dry-run plan of a quantization: convert's plan plus the settings and how many weights."""

    quantization: QuantSettings
    quantized_tensors: int

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"quantization": self.quantization.to_dict(), "quantized_tensors": self.quantized_tensors}


class QuantEmitter:
    """Writes a plan's tensors: float ones through convert's Emitter, quantized modules computed here.

    A module is quantized when its weight_packed is written (streamed block by block); its scale,
    zero point and shape wait in `pending` for their turn, which comes right after.
    """

    def __init__(self, source, peak: PeakRss, importance: dict[str, torch.Tensor] | None = None):
        self.source, self.peak = source, peak
        self.importance = importance or {}  # module -> column importance (--calib; converters/calibrate.py)
        self.base = Emitter(source, False, peak)
        self.pending: dict[str, torch.Tensor] = {}
        self.errors: dict[str, dict[str, Any]] = {}  # module -> error row

    def __call__(self, sf: ShardFile, t) -> None:
        if not isinstance(t, QuantOut):
            self.base(sf, t)
            return
        if t.name not in self.pending:
            self.run(t, sf if t.role == PACKED else _Discard())
            if t.role == PACKED:
                return
        data = self.pending.pop(t.name)
        sf.write(byte_view(data))

    def run(self, t: QuantOut, sink) -> dict[str, torch.Tensor]:
        """Quantize t's module, streaming weight_packed into sink.write() block by block; keep and return
        the module's other tensors (scale, shape, zero point: small) in `pending`."""
        base, s = t.base, t.scheme
        n, k = base.shape
        rows = _rows(self.source, base)
        scale_dtype = torch_dtype(SCALE_CODES[base.src_dtype])
        scales, zeros = [], []
        err2 = ref2 = 0.0
        step = max(1, ROW_BLOCK_ELEMS // k)
        importance = self.importance.get(t.module)  # None: not calibrated, or an expert no token reached
        for r in range(0, n, step):
            w = rows(r, min(n, r + step))  # [R, K], memory-mapped
            qt = quantize(w, s, scale_dtype, importance)
            e, f = error_sums(w, dequantize(qt))
            err2, ref2 = err2 + e, ref2 + f
            sink.write(byte_view(pack_int32(qt.q, s.bits)))
            scales.append(qt.scale)
            if qt.zero is not None:
                zeros.append(qt.zero)
            self.peak.sample()
        m = t.module
        out = {f"{m}.{SCALE}": torch.cat(scales), f"{m}.{SHAPE}": torch.tensor([n, k], dtype=torch.int64)}
        if zeros:
            out[f"{m}.{ZERO_POINT}"] = pack_int32(torch.cat(zeros), s.bits, dim=0)
        self.pending.update(out)
        self.errors[m] = {"tensor": base.name, "component": component_of(base.name), "scheme": s.label, "numel": n * k,
                          "calibrated": importance is not None, **error_stats(err2, ref2), "_err2": err2, "_ref2": ref2}  # fmt: skip
        return out

    def close(self) -> None:
        self.base.close()


class _Discard:
    def write(self, data) -> None:
        pass


class _Compare:
    """A sink that compares what is written with the bytes of an existing tensor, in order."""

    def __init__(self, raw: memoryview):
        self.raw, self.pos, self.same = raw, 0, True

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.same = self.same and same_bytes(view, self.raw[self.pos : self.pos + len(view)])
        self.pos += len(view)


def _rows(source, base) -> Callable[[int, int], torch.Tensor]:
    """rows(a, b) -> rows a..b-1 of the float weight `base` ([N, K]), read from the source."""
    n, k = base.shape
    if len(base.parts) == 1:
        part = base.parts[0]
        flat = source.flat(part.source)
        return lambda a, b: flat[part.start + a * k : part.start + b * k].view(b - a, k)
    whole = torch.cat([source.flat(p.source)[p.start : p.start + p.count] for p in base.parts]).view(n, k)
    return lambda a, b: whole[a:b]


def quantize_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    bits: int = 4,
    group_size: int | None = None,
    symmetric: bool | None = None,
    method: str = "rtn",
    embeddings: bool = False,
    lm_head: bool = False,
    include: tuple[str, ...] | list[str] = (),
    exclude: tuple[str, ...] | list[str] = (),
    max_shard_size: str | int = "5GB",
    dry_run: bool = False,
    force: bool = False,
    verify: bool = False,
    eval_text: str | os.PathLike | None = None,
    eval_window: int | None = None,
    calib: str | os.PathLike | None = None,
    calib_tokens: int = 2048,
    revision: str | None = None,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    calib_progress: Callable[[int, int], None] | None = None,
    eval_progress: Callable[[int, int], None] | None = None,
) -> QuantizeResult | QuantizeDryRun:
    """Quantize the checkpoint at `src` (a path, or a Hugging Face repo id in the local cache at `revision`)
    into `dst` (compressed-tensors pack-quantized); return what was written (its to_dict() is `--json`).

    bits 8: symmetric, one scale per output channel; bits 4: groups of group_size (default 128)
    columns, asymmetric unless symmetric=True. method: 'rtn' (round to nearest) or 'mse' (a search
    for the scale and zero point of every group that minimises its reconstruction error).
    Quantized by default: attention projections, routed and shared experts (and dense MLPs);
    embeddings / lm_head only when asked; never the router, router_scale, norms or biases.
    include / exclude: globs on tensor (or module) names. Experts are written per expert.
    dry_run: the plan only; verify: re-read the output and compare it with a fresh quantization;
    eval_text: perplexity of the source and of the output on that text (needs a tokenizer).
    calib: a text file run through the model (its first calib_tokens tokens) to weight each column's
    error in the mse search by the activations it meets (converters/calibrate.py; method mse only);
    device: where the model runs for calib and eval_text (checked first; the rounding itself runs on the CPU);
    calib_progress(1, layers) after each layer of it, progress(bytes, total) while writing,
    eval_progress(tokens scored, total) during eval_text (the source's pass, then the output's).
    Raises UsageError / CheckpointError (exit 2), VerifyError (1).
    """
    from moge_cli.devices import check_device

    t0 = time.perf_counter()
    peak = PeakRss()
    opts = QuantOptions(bits, group_size, symmetric, method, embeddings, lm_head, tuple(include), tuple(exclude))
    if calib is not None and method != "mse":
        raise UsageError("--calib weights the mse search: add --method mse")
    check_device(device)  # before anything is read or written
    max_bytes = parse_size(max_shard_size)
    src = resolve_location(src, revision)  # once: calibration and --eval read the same snapshot
    source = open_source(src)
    try:
        plan, schemes, notes = build_quant_plan(source.tensors, source.config_dict, opts)
        layouts, copies, disk, bytes_in, dst = prepare(plan, source, dst, force, max_bytes)
        settings = plan.ranks[0].config["moge_quantization"]
        if dry_run:
            base = describe(plan, layouts, source, dst, copies, disk, bytes_in, peak)
            base.estimated_peak_rss_bytes += ROW_BLOCK_ELEMS * 40  # a row block in float32 and its temporaries
            base.notes = list(source.notes) + notes
            return QuantizeDryRun(**vars(base), quantization=QuantSettings(**settings), quantized_tensors=len(schemes))
        cal = None
        if calib is not None:
            cal = calibrate(src, calib, max_tokens=calib_tokens, device=device, progress=calib_progress)
            settings["calibration"] = cal.summary(Path(calib).name)  # into config.json's moge_quantization too
            peak.sample()
        tick, cleanup_notes = start_writing(layouts, dst, disk, progress)
        emitter = QuantEmitter(source, peak, cal and cal.importance)
        outputs: list[Path] = []
        try:
            with staging_dir(dst) as tmp:
                rank, shards = layouts[0]
                outputs = [p.relative_to(tmp) for p in write_shards(tmp, shards, emitter, tick)]
                if cal is not None:  # the quantized weights the calibration weighted
                    settings["calibration"]["modules"] = sum(row["calibrated"] for row in emitter.errors.values())
                (tmp / "config.json").write_text(json.dumps(rank.config, indent=2) + "\n")
                for f in copies:
                    shutil.copyfile(f, tmp / f.name)
                if verify:
                    verify_quantized(source, shards, tmp, rank.config, cal and cal.importance)
                    peak.sample()
        finally:
            emitter.close()
        entries = output_entries(dst, outputs)
        result = QuantizeResult(
            source=str(source.source),
            destination=str(dst),
            quantization=QuantSettings(**settings),
            tensors=len(plan.tensors),
            quantized_tensors=len(schemes),
            bytes_in=bytes_in,
            bytes_out=sum(e["bytes"] for e in entries),
            seconds=round(time.perf_counter() - t0, 3),
            peak_rss_bytes=peak.peak,
            outputs=entries,
            quality=quality_report(emitter.errors),
            verified=verify,
            notes=list(source.notes) + notes + cleanup_notes,
        )
    finally:
        source.close()
    if eval_text is not None:
        result.eval = evaluate(src, dst, eval_text, window=eval_window, device=device, progress=eval_progress)
    return result


def quality_report(errors: dict[str, dict[str, Any]]) -> QualityReport:
    """Per tensor (relative Frobenius error, SQNR) and per component (pooled error, mean / worst SQNR)."""
    tensors = [{k: v for k, v in row.items() if not k.startswith("_")} for row in errors.values()]
    comps: dict[str, dict[str, Any]] = {}
    for row in errors.values():
        c = comps.setdefault(row["component"], {"tensors": 0, "_err2": 0.0, "_ref2": 0.0, "_sqnr": []})
        c["tensors"] += 1
        c["_err2"] += row["_err2"]
        c["_ref2"] += row["_ref2"]
        c["_sqnr"].append(row["sqnr_db"])
    summary = {}
    for name in sorted(comps, key=lambda c: COMPONENT_ORDER.index(c) if c in COMPONENT_ORDER else len(COMPONENT_ORDER)):
        c = comps[name]
        pooled = error_stats(c["_err2"], c["_ref2"])
        summary[name] = {
            "tensors": c["tensors"], "rel_error": pooled["rel_error"], "sqnr_db": pooled["sqnr_db"],
            "mean_sqnr_db": sum(c["_sqnr"]) / len(c["_sqnr"]), "min_sqnr_db": min(c["_sqnr"]),
        }  # fmt: skip
    total = error_stats(sum(r["_err2"] for r in errors.values()), sum(r["_ref2"] for r in errors.values()))
    return QualityReport(tensors=tensors, components=summary, overall=total)


def verify_quantized(source, shards, out_dir: Path, config: dict[str, Any], importance: dict[str, torch.Tensor] | None = None) -> None:
    """Re-read the output: float tensors must equal their recipe, quantized ones a fresh quantization
    (with the same calibration importance, if any)."""
    bad: list[str] = []
    ck = open_checkpoint(out_dir)
    fresh = QuantEmitter(source, PeakRss(), importance)
    try:
        planned = {t.name: t for s in shards for t in s.tensors}
        for name in sorted(set(ck.tensors) ^ set(planned)):
            bad.append(f"{name}: {'not planned' if name in ck.tensors else 'missing from the output'}")
        if json.loads((out_dir / "config.json").read_text()) != config:
            bad.append("config.json: differs from the planned config")
        for name, t in planned.items():
            info = ck.tensors.get(name)
            if info is None:
                continue
            if info.dtype != t.dtype or info.shape != t.shape:
                bad.append(f"{name}: {info.dtype} {list(info.shape)}, planned {t.dtype} {list(t.shape)}")
            elif not isinstance(t, QuantOut):
                if not tensor_matches(source, t, ck.raw(name), False):
                    bad.append(f"{name}: values differ from the source ({t.recipe()})")
            else:
                if t.role == PACKED:  # the packed weight is compared block by block as it is recomputed
                    cmp = _Compare(ck.raw(name))
                    fresh.run(t, cmp)
                    same = cmp.same and cmp.pos == info.nbytes
                else:
                    if name not in fresh.pending:
                        fresh.run(planned[f"{t.module}.{PACKED}"], _Discard())
                    same = same_bytes(byte_view(fresh.pending.pop(name)), ck.raw(name))
                if not same:
                    bad.append(f"{name}: differs from a fresh {t.scheme.label} {t.scheme.method} quantization of {t.base.name}")
    finally:
        fresh.close()
        ck.close()
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise VerifyError(f"verification failed for {len(bad)} item(s): {'; '.join(bad[:10])}{more}; nothing was written")


def evaluate(
    src, dst, text_file, *, window: int | None = None, device: str = "cpu", progress: Callable[[int, int], None] | None = None
) -> EvalResult:
    """Perplexity of the source and of the quantized checkpoint on a text file (the source's tokenizer), on `device`."""
    from moge_cli.devices import check_device
    from moge_cli.loader import load_model
    from moge_cli.perplexity import perplexity
    from moge_cli.tokenizer import has_tokenizer, load_tokenizer

    check_device(device)
    source = open_source(src)
    root = source.root
    source.close()
    if not has_tokenizer(root):
        raise UsageError(f"{root}: --perplexity needs a tokenizer (tokenizer.model or tokenizer.json)")
    ids = load_tokenizer(root).encode(Path(text_file).read_text(encoding="utf-8"), add_bos=True)
    runs = []  # perplexity() of the source, then of the output
    for n, path in enumerate((src, dst)):
        model = load_model(path, device=device)
        tick = progress and (lambda done, total, n=n: progress(n * total + done, 2 * total))  # over both passes
        runs.append(perplexity(model, ids, window=window, progress=tick))
        del model
    before, after = runs[0]["perplexity"], runs[1]["perplexity"]
    return EvalResult(str(text_file), len(ids), before, runs[1]["window"], runs[1]["stride"], after, after / before - 1)


__all__ = ["quantize_checkpoint", "QuantizeResult", "QuantizeDryRun", "QuantSettings", "QualityReport", "EvalResult", "QuantEmitter",
           "quality_report", "verify_quantized", "evaluate"]  # fmt: skip
