"""`convert()`: plan from the source headers, stream every output shard into a staging directory, verify, rename.

Memory: a tensor that keeps its dtype is copied file-to-file with sendfile (safetensors input) or
from its memory map (PyTorch input) and never enters anonymous memory; a cast goes through two
fixed buffers of CHUNK_ELEMS elements. Nothing scales with the model or with a tensor's size,
except a PyTorch tensor that is not contiguous in its file (copied once to lay it out).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from moge_cli.safetensors_format import DTYPE_SIZES, TORCH_NAMES

from converters.cast import CHUNK_ELEMS, CastStats, Fp16OverflowError, cast_chunk, torch_dtype
from converters.plan import OutTensor, Plan, RankPlan, build_plan
from converters.shards import INDEX_NAME, Shard, ShardFile, check_destination, check_free_space, parse_size, plan_shards, staging_dir, write_shards
from converters.sources import files_to_copy, open_source

EP_PLAN_NAME = "ep_plan.json"
COPY_CHUNK = 64 * 1024 * 1024  # bytes per write when copying from a memory map


def rss_anon() -> int:
    """This process's anonymous resident memory (RssAnon) in bytes; memory-mapped file pages do not count."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRss:
    """The highest RssAnon seen, sampled after every tensor and every cast chunk."""

    def __init__(self) -> None:
        self.start = self.peak = rss_anon()

    def sample(self) -> None:
        self.peak = max(self.peak, rss_anon())


class _Overflow(Exception):
    """Internal: the first float16 overflow without clamp; the caller scans everything for the report."""


class Emitter:
    """Writes one OutTensor's bytes into a ShardFile by following its recipe (the per-tensor transform)."""

    def __init__(self, source, clamp: bool, peak: PeakRss):
        self.source, self.clamp, self.peak = source, clamp, peak
        self.stats = CastStats()
        self._fds: dict[Path, int] = {}
        self._bufs: dict[torch.dtype, torch.Tensor] = {}
        self._counted: set[tuple] = set()  # recipes already counted (replicated tensors of --ep count once)

    def __call__(self, sf: ShardFile, t: OutTensor, label: str | None = None) -> None:
        esize = DTYPE_SIZES[t.src_dtype]
        count = t.parts not in self._counted
        self._counted.add(t.parts)
        for part in t.parts:
            if t.cast:
                self._cast(sf, t, part, label or t.name, count)
            elif self.source.direct:
                path, start = self.source.file_range(part.source)
                sf.send(self._fd(path), start + part.start * esize, part.count * esize)
            else:
                raw = self.source.raw(part.source)
                a, b = part.start * esize, (part.start + part.count) * esize
                for c in range(a, b, COPY_CHUNK):
                    sf.write(raw[c : min(b, c + COPY_CHUNK)])
        self.peak.sample()

    def _cast(self, sf: ShardFile | None, t: OutTensor, part, label: str, count: bool) -> None:
        dtype = torch_dtype(t.dtype)
        flat = self.source.flat(part.source)
        buf = self._bufs.get(dtype)
        if buf is None:
            buf = self._bufs[dtype] = torch.empty(CHUNK_ELEMS, dtype=dtype)
        end = part.start + part.count
        for a in range(part.start, end, CHUNK_ELEMS):
            x = flat[a : min(end, a + CHUNK_ELEMS)]
            y, over = cast_chunk(x, dtype, self.clamp, out=buf)
            if count:
                self.stats.add(label, x.numel(), over)
            if over and not self.clamp and sf is not None:
                raise _Overflow
            if sf is not None:
                sf.write(y.view(torch.uint8).numpy())
            self.peak.sample()

    def scan(self, tensors: list[tuple[str, OutTensor]]) -> CastStats:
        """Count float16 overflows of every cast without writing (the refusal report)."""
        self.stats, self._counted = CastStats(), set()
        for label, t in tensors:
            if t.cast and t.parts not in self._counted:
                self._counted.add(t.parts)
                for part in t.parts:
                    self._cast(None, t, part, label, True)
        return self.stats

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    layout: str | None = None,
    dtype: str | None = None,
    clamp: bool = False,
    max_shard_size: str | int = "5GB",
    layers: str | list[int] | None = None,
    ep: int | None = None,
    dry_run: bool = False,
    force: bool = False,
    verify: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Convert the checkpoint at `src` into a new directory `dst`; return the summary (`--json`).

    layout: 'per-expert' | 'stacked' (default: keep); dtype: 'bfloat16' | 'float16' | 'float32'
    (default: keep); clamp: clamp float16 overflows instead of refusing; max_shard_size: '5GB',
    '512MiB' or bytes; layers: '0-1,5' or a list, kept and renumbered from 0; ep: N rank
    directories of whole expert groups plus ep_plan.json; dry_run: return the plan, write nothing;
    force: replace an existing dst; verify: re-read the output and compare every tensor with its
    recipe before it is renamed into place. progress(n_bytes, total_bytes) is called as data is written.

    Raises UsageError / CheckpointError / ConfigError (exit 2), Fp16OverflowError (2),
    WriteError (2, partial output removed), VerifyError (1). Ctrl-C removes partial output too.
    """
    t0 = time.perf_counter()
    peak = PeakRss()
    max_bytes = parse_size(max_shard_size)
    source = open_source(src)
    try:
        plan = build_plan(source.tensors, source.config_dict, layout=layout, dtype=dtype, layers=layers, ep=ep)
        layouts = [(r, plan_shards(r.tensors, max_bytes)) for r in plan.ranks]
        copies = files_to_copy(source.root)
        disk = _disk_bytes(plan, layouts, copies)
        bytes_in = sum(source.tensors[n].nbytes for n in plan.sources_used)
        if dry_run:
            return describe(plan, layouts, source, dst, copies, disk, bytes_in, peak)
        dst = Path(dst)
        check_destination(source.root, dst, force)
        check_free_space(next(p for p in [dst.parent, *dst.parent.parents] if p.exists()), disk)
        total = sum(s.data_bytes for _, shards in layouts for s in shards)
        tick = (lambda n: progress(n, total)) if progress else None
        emitter = Emitter(source, clamp, peak)
        outputs: list[Path] = []
        try:
            with staging_dir(dst) as tmp:
                try:
                    for rank, shards in layouts:
                        out = tmp / rank.subdir
                        out.mkdir(exist_ok=True)
                        label = (lambda sf, t, sub=rank.subdir: emitter(sf, t, f"{sub}/{t.name}")) if rank.subdir else emitter
                        outputs += [p.relative_to(tmp) for p in write_shards(out, shards, label, tick)]
                        (out / "config.json").write_text(json.dumps(rank.config, indent=2) + "\n")
                        for f in copies:
                            shutil.copyfile(f, out / f.name)
                    if plan.ep_plan:
                        (tmp / EP_PLAN_NAME).write_text(json.dumps(plan.ep_plan, indent=2) + "\n")
                except _Overflow:
                    raise Fp16OverflowError(emitter.scan(_labelled(layouts))) from None
                if verify:
                    from converters.verify import verify_output

                    verify_output(source, layouts, tmp, clamp)
                    peak.sample()
        finally:
            emitter.close()
        stats = emitter.stats
        return {
            "source": str(source.source),
            "destination": str(dst),
            "layout": {"from": plan.src_layout, "to": plan.layout},
            "dtype": plan.dtype,
            "tensors": len(plan.tensors),
            "bytes_in": bytes_in,
            "bytes_out": sum((dst / p).stat().st_size for p in outputs),
            "seconds": round(time.perf_counter() - t0, 3),
            "peak_rss_bytes": peak.peak,
            "outputs": [{"file": str(p), "bytes": (dst / p).stat().st_size} for p in outputs],
            "clamped": {"values": stats.total_overflow, "tensors": dict(stats.worst(20))},
            "verified": verify,
            "ep": plan.ep_plan is not None and {"world_size": len(plan.ranks), "plan": EP_PLAN_NAME},
            "notes": list(source.notes),
        }
    finally:
        source.close()


def _labelled(layouts: list[tuple[RankPlan, list[Shard]]]) -> list[tuple[str, OutTensor]]:
    return [(f"{r.subdir}/{t.name}" if r.subdir else t.name, t) for r, shards in layouts for s in shards for t in s.tensors]


def _disk_bytes(plan: Plan, layouts, copies: list[Path]) -> int:
    """Bytes the output takes: shards (exact), configs, indexes, copied files, the EP plan."""
    n = sum(s.file_bytes for _, shards in layouts for s in shards)
    n += sum(len(json.dumps(r.config, indent=2)) + 1 + 80 * len(r.tensors) + 100 for r in plan.ranks)  # config + index
    n += len(plan.ranks) * sum(f.stat().st_size for f in copies)
    return n + (len(json.dumps(plan.ep_plan, indent=2)) + 1 if plan.ep_plan else 0)


def estimated_peak(plan: Plan, source, base: int) -> int:
    """A conservative RssAnon estimate: now (interpreter, torch, plan) + cast buffers + what must be laid out."""
    n = base
    if any(t.cast for t in plan.tensors):
        n += CHUNK_ELEMS * (4 + 8 + 8)  # output buffer, plus float32 copy and masks in a chunk that overflows
    if not source.direct:  # a PyTorch tensor that is not contiguous is copied once
        n += max((source.tensors[s].nbytes for s in plan.sources_used), default=0)
    return n


def describe(plan: Plan, layouts, source, dst, copies: list[Path], disk: int, bytes_in: int, peak: PeakRss) -> dict[str, Any]:
    """The --dry-run report: output shards with their tensors, dtype changes, peak memory and disk estimates."""
    changes: dict[str, int] = {}
    for t in plan.tensors:
        if t.cast:
            key = f"{TORCH_NAMES[t.src_dtype]} -> {TORCH_NAMES[t.dtype]}"
            changes[key] = changes.get(key, 0) + 1
    peak.sample()
    return {
        "dry_run": True,
        "source": str(source.source),
        "destination": str(dst),
        "layout": {"from": plan.src_layout, "to": plan.layout},
        "dtype": plan.dtype,
        "dtype_changes": changes,
        "tensors": len(plan.tensors),
        "bytes_in": bytes_in,
        "disk_bytes": disk,
        "estimated_peak_rss_bytes": estimated_peak(plan, source, peak.peak),
        "largest_tensor_bytes": max((t.nbytes for t in plan.tensors), default=0),
        "outputs": [
            {
                "file": str(Path(r.subdir) / s.file),
                "bytes": s.file_bytes,
                "tensors": [
                    {"name": t.name, "dtype": TORCH_NAMES[t.dtype], "shape": list(t.shape), "bytes": t.nbytes, "from": t.recipe()}
                    for t in s.tensors
                ],
            }
            for r, shards in layouts
            for s in shards
        ],
        "index": [str(Path(r.subdir) / INDEX_NAME) for r in plan.ranks],
        "copied_files": [f.name for f in copies],
        "ep_plan": plan.ep_plan,
        "notes": list(source.notes),
    }
