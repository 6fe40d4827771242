"""`convert()`: plan from the source headers, stream every output shard into a staging directory, verify, rename;
returns a ConvertResult (a DryRunPlan with dry_run).

torch is imported only for a plan that casts (converters/cast.py): a layout change, re-shard,
--layers or --ep split of a safetensors checkpoint only moves bytes, and starts without it.

Memory: a tensor that keeps its dtype is copied file-to-file with sendfile (safetensors input) or
from its memory map (PyTorch input) and never enters anonymous memory; a cast goes through fixed
buffers (per cast thread: one block of BLOCK_ELEMS outputs and a float32 chunk). Nothing scales with
the model or with a tensor's size, except a PyTorch tensor that is not contiguous in its file
(copied once to lay it out).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from moge_cli.profiling import proc_status_kib
from moge_cli.safetensors_format import DTYPE_SIZES, TORCH_NAMES

from moge_converters.overflow import CastStats, Fp16OverflowError
from moge_converters.plan import OutTensor, Plan, RankPlan, build_plan
from moge_converters.shards import INDEX_NAME, Shard, ShardFile, check_destination, check_free_space, parse_size, plan_shards, remove_stale_staging, staging_dir, write_shards
from moge_converters.sources import files_to_copy, open_source

EP_PLAN_NAME = "ep_plan.json"
COPY_CHUNK = 64 * 1024 * 1024  # bytes per write when copying from a memory map
CAST_THREADS = max(1, min(4, os.cpu_count() or 1))  # casting is the one CPU-bound step; the kernel copies the rest
MAX_IN_FLIGHT = 4 * CAST_THREADS  # queued cast blocks before the caller waits (each thread has its own buffers)


@dataclass
class ConvertResult:
    """What `convert()` wrote: sizes, time, peak memory, output files, clamped values; `to_dict()` is its --json."""

    source: str
    destination: str
    src_layout: str  # per-expert | stacked
    layout: str
    dtype: str | None  # the output dtype (torch name); None: each tensor kept its own
    tensors: int  # tensors written (per rank: replicated ones counted once)
    bytes_in: int  # source tensor bytes read
    bytes_out: int  # output file bytes
    seconds: float
    peak_rss_bytes: int  # anonymous resident memory (memory-mapped pages not counted)
    outputs: list[dict[str, Any]]  # [{"file": path relative to destination, "bytes"}]
    clamped_values: int  # float16 overflows clamped to +-65504 (clamp=True)
    clamped_tensors: dict[str, int]  # the 20 tensors with the most, name -> count
    verified: bool
    ep: int | None  # ranks of an --ep split; None: one checkpoint
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "destination": self.destination, "layout": {"from": self.src_layout, "to": self.layout},
            "dtype": self.dtype, "tensors": self.tensors, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "seconds": self.seconds, "peak_rss_bytes": self.peak_rss_bytes, "outputs": self.outputs,
            "clamped": {"values": self.clamped_values, "tensors": self.clamped_tensors}, "verified": self.verified,
            "ep": self.ep is not None and {"world_size": self.ep, "plan": EP_PLAN_NAME},  # False without --ep
            "notes": self.notes,
        }  # fmt: skip


@dataclass
class DryRunPlan:
    """What `convert(dry_run=True)` would write: shards with their tensors, dtype changes, memory and disk estimates."""

    source: str
    destination: str
    src_layout: str
    layout: str
    dtype: str | None
    dtype_changes: dict[str, int]  # "bfloat16 -> float16" -> tensors
    tensors: int
    bytes_in: int
    disk_bytes: int  # what the output will take, configs and copied files included
    estimated_peak_rss_bytes: int
    largest_tensor_bytes: int
    outputs: list[dict[str, Any]]  # [{"file", "bytes", "tensors": [{"name", "dtype", "shape", "bytes", "from"}]}]
    index: list[str]  # index files, one per rank
    copied_files: list[str]  # tokenizer, generation config...
    ep_plan: dict[str, Any] | None  # ep_plan.json's content with --ep, else None
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layout"] = {"from": d.pop("src_layout"), "to": d["layout"]}
        return {"dry_run": True, **{k: d[k] for k in DRY_RUN_KEYS}}


DRY_RUN_KEYS = ("source", "destination", "layout", "dtype", "dtype_changes", "tensors", "bytes_in", "disk_bytes", "estimated_peak_rss_bytes",
                "largest_tensor_bytes", "outputs", "index", "copied_files", "ep_plan", "notes")  # --json order  # fmt: skip


def rss_anon() -> int:
    """This process's anonymous resident memory (RssAnon) in bytes; memory-mapped file pages do not count (0 without /proc)."""
    return (proc_status_kib("RssAnon") or 0) * 1024


class PeakRss:
    """The highest RssAnon seen, sampled after tensors and cast blocks, at most every `every` seconds."""

    def __init__(self, every: float = 0.01) -> None:
        self.start = self.peak = rss_anon()
        self.every, self.last = every, time.monotonic()

    def sample(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last >= self.every:
            self.peak, self.last = max(self.peak, rss_anon()), now


class _Overflow(Exception):
    """Internal: the first float16 overflow without clamp; the caller scans everything for the report."""


class Emitter:
    """Writes one OutTensor's bytes into a ShardFile by following its recipe (the per-tensor transform)."""

    def __init__(self, source, clamp: bool, peak: PeakRss):
        self.source, self.clamp, self.peak = source, clamp, peak
        self.stats = CastStats()
        self._fds: dict[Path, int] = {}
        self._local = threading.local()
        self._executor: ThreadPoolExecutor | None = None
        self._pending: deque = deque()  # (future, stats label or None, elements, bytes, shard file) of queued blocks
        self._counted: set[tuple] = set()  # recipes already counted (replicated tensors of --ep count once)

    def __call__(self, sf: ShardFile, t: OutTensor, label: str | None = None) -> None:
        if t.cast:
            self._cast(sf, t, label or t.name)
        else:
            esize = DTYPE_SIZES[t.src_dtype]
            for part in t.parts:
                if self.source.direct:
                    path, start = self.source.file_range(part.source)
                    sf.send(self._fd(path), start + part.start * esize, part.count * esize)
                else:
                    raw = self.source.raw(part.source)
                    a, b = part.start * esize, (part.start + part.count) * esize
                    for c in range(a, b, COPY_CHUNK):
                        sf.write(raw[c : min(b, c + COPY_CHUNK)])
        self.peak.sample()

    def _cast(self, sf: ShardFile | None, t: OutTensor, label: str) -> None:
        """Cast t in blocks on the pool's threads, each pwritten at its offset in a reserved range.

        Torch ops and pwrite release the GIL, so blocks (of this tensor and the next ones) are cast
        and written in parallel, each in its thread's own buffers; the caller moves on at once and
        waits only at the shard's barrier (before a sequential write or the close) or when
        MAX_IN_FLIGHT blocks are queued.
        """
        from moge_converters.cast import BLOCK_ELEMS  # torch: only a plan that casts gets here

        count = t.parts not in self._counted  # replicated tensors of --ep are counted once
        self._counted.add(t.parts)
        key, out_size = (t.src_dtype, t.dtype), DTYPE_SIZES[t.dtype]
        pieces = []  # (source: (fd, byte offset) or 1-D tensor, first element, elements, byte offset in the output)
        done = 0
        for part in t.parts:
            if self.source.direct:
                path, start = self.source.file_range(part.source)
                src = (self._fd(path), start)
            else:
                src = self.source.flat(part.source)
            for a in range(part.start, part.start + part.count, BLOCK_ELEMS):
                k = min(BLOCK_ELEMS, part.start + part.count - a)
                pieces.append((src, a, k, done * out_size))
                done += k
        if sf is None:  # the overflow scan: no writes, in this thread
            for src, a, k, _ in pieces:
                self.stats.add(label, k, self._caster(key).cast_block(src, a, k)[0])
            return
        base = sf.reserve(t.nbytes)
        for src, a, k, off in pieces:
            future = self._pool().submit(self._piece, key, src, a, k, sf, base + off)
            self._pending.append((future, label if count else None, k, k * out_size, sf))
        sf.barrier, sf.on_abort = self._drain, self._cancel
        while len(self._pending) > MAX_IN_FLIGHT:
            self._drain_one()

    def _drain_one(self) -> None:
        future, label, k, nbytes, sf = self._pending.popleft()
        try:
            over = future.result()
        except BaseException:
            self._cancel()
            raise
        if label is not None:
            self.stats.add(label, k, over)
        if sf.progress:
            sf.progress(nbytes)
        self.peak.sample()
        if over and not self.clamp:
            self._cancel()
            raise _Overflow

    def _drain(self) -> None:
        """Wait for every queued block (a shard's barrier): the bytes before the next write are all there."""
        while self._pending:
            self._drain_one()

    def _cancel(self) -> None:
        """After an error: drop queued blocks and wait for the running ones, so no thread writes any more."""
        futures = [p[0] for p in self._pending]
        self._pending.clear()
        for f in futures:
            f.cancel()
        wait(futures)

    def _piece(self, key: tuple[str, str], src, a: int, k: int, sf: ShardFile, offset: int) -> int:
        over, data = self._caster(key).cast_block(src, a, k)
        sf.write_at(data, offset)
        return over

    def _caster(self, key: tuple[str, str]):
        """This thread's Caster for (source dtype, output dtype): its buffers are its own."""
        casters = self._local.__dict__.setdefault("casters", {})
        if key not in casters:
            from moge_converters.cast import Caster, torch_dtype

            casters[key] = Caster(torch_dtype(key[0]), torch_dtype(key[1]), self.clamp)
        return casters[key]

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=CAST_THREADS, thread_name_prefix="moge-cast")
        return self._executor

    def scan(self, tensors: list[tuple[str, OutTensor]]) -> CastStats:
        """Count float16 overflows of every cast without writing (the refusal report)."""
        self.stats, self._counted = CastStats(), set()
        for label, t in tensors:
            if t.cast:
                self._cast(None, t, label)
        return self.stats

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
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
    revision: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ConvertResult | DryRunPlan:
    """Convert the checkpoint at `src` (a path, or a Hugging Face repo id in the local cache at
    `revision`) into a new directory `dst`; return what was written (its to_dict() is `--json`). The top directory of an
    `ep` split is read as the checkpoint it came from: converting it merges the ranks back.

    layout: 'per-expert' | 'stacked' (default: keep); dtype: 'bfloat16' | 'float16' | 'float32'
    (default: keep); clamp: clamp float16 overflows instead of refusing; max_shard_size: '5GB',
    '512MiB' or bytes; layers: '0-1,5' or a list, kept and renumbered from 0; ep: N rank
    directories of whole expert groups plus ep_plan.json; dry_run: return the DryRunPlan, write nothing;
    force: replace an existing dst; verify: re-read the output and compare every tensor with its
    recipe before it is renamed into place. progress(n_bytes, total_bytes) is called as data is written.

    Raises UsageError / CheckpointError / ConfigError (exit 2), Fp16OverflowError (2),
    WriteError (2, partial output removed), VerifyError (1). Ctrl-C removes partial output too.
    """
    t0 = time.perf_counter()
    peak = PeakRss()
    max_bytes = parse_size(max_shard_size)
    source = open_source(src, revision=revision)
    with ExitStack() as cleanup:
        cleanup.callback(source.close)
        split_layout = getattr(source, "layout", None)  # a split (SplitSource) merges back to its ranks' layout by default
        plan = build_plan(source.tensors, source.config_dict, layout=layout or split_layout, dtype=dtype, layers=layers, ep=ep)
        plan.src_layout = split_layout or plan.src_layout  # its experts are read as per-expert views
        if computes(plan, source):
            from moge_converters.cast import one_torch_thread  # torch: imported only when it computes

            cleanup.enter_context(one_torch_thread())
        layouts, copies, disk, bytes_in, dst = prepare(plan, source, dst, force, max_bytes)
        if dry_run:
            return describe(plan, layouts, source, dst, copies, disk, bytes_in, peak)
        tick, cleanup_notes = start_writing(layouts, dst, disk, progress)
        emitter = Emitter(source, clamp, peak)
        outputs: list[Path] = []
        gc_was_on = gc.isenabled()
        gc.disable()  # the loop makes no cycles; collections held the GIL the casting threads wait for (5% of the CPU)
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
                    peak.sample(force=True)
                except _Overflow:
                    raise Fp16OverflowError(emitter.scan(_labelled(layouts))) from None
                if verify:
                    from moge_converters.verify import verify_output

                    verify_output(source, layouts, tmp, clamp)
                    peak.sample(force=True)
        finally:
            emitter.close()
            if gc_was_on:
                gc.enable()
        stats = emitter.stats
        entries = output_entries(dst, outputs)
        return ConvertResult(
            source=str(source.source),
            destination=str(dst),
            src_layout=plan.src_layout,
            layout=plan.layout,
            dtype=plan.dtype,
            tensors=len(plan.tensors),
            bytes_in=bytes_in,
            bytes_out=sum(e["bytes"] for e in entries),
            seconds=round(time.perf_counter() - t0, 3),
            peak_rss_bytes=peak.peak,
            outputs=entries,
            clamped_values=stats.total_overflow,
            clamped_tensors=dict(stats.worst(20)),
            verified=verify,
            ep=len(plan.ranks) if plan.ep_plan is not None else None,
            notes=list(source.notes) + cleanup_notes,
        )


def computes(plan: Plan, source) -> bool:
    """Whether writing `plan` runs torch ops: casts, or PyTorch tensors laid out. Anything else only moves bytes."""
    return not source.direct or any(t.cast for t in plan.tensors)


def prepare(plan: Plan, source, dst, force: bool, max_bytes: int) -> tuple[list[tuple[RankPlan, list[Shard]]], list[Path], int, int, Path]:
    """What convert and quantize settle before writing: (shard layouts per rank, non-weight files to
    copy, disk bytes needed, source bytes read, destination), with the destination checked."""
    layouts = [(r, plan_shards(r.tensors, max_bytes)) for r in plan.ranks]
    copies = files_to_copy(getattr(source, "files_root", source.root))  # a split's: those of its rank 0
    dst = Path(dst)
    check_destination(source.root, dst, force)
    bytes_in = sum(source.tensors[n].nbytes for n in plan.sources_used)
    return layouts, copies, _disk_bytes(plan, layouts, copies), bytes_in, dst


def start_writing(layouts, dst: Path, disk: int, progress: Callable[[int, int], None] | None) -> tuple[Callable[[int], None] | None, list[str]]:
    """Remove what killed runs left beside dst (their staging can hold full-size shards), check free space
    where dst will be; return (the per-write progress tick or None, a note per stale directory removed)."""
    notes = remove_stale_staging(dst)
    check_free_space(next(p for p in [dst.parent, *dst.parent.parents] if p.exists()), disk)
    total = sum(s.data_bytes for _, shards in layouts for s in shards)
    return ((lambda n: progress(n, total)) if progress else None), notes


def output_entries(dst: Path, outputs: list[Path]) -> list[dict[str, Any]]:
    return [{"file": str(p), "bytes": (dst / p).stat().st_size} for p in outputs]


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
        from moge_converters.cast import BLOCK_ELEMS, CHUNK_ELEMS  # loaded already: the plan casts

        n += (CAST_THREADS + 1) * (BLOCK_ELEMS * 4 + CHUNK_ELEMS * 28)  # per casting thread: block, read and float32 buffers, temporaries
    if not source.direct:  # a PyTorch tensor that is not contiguous is copied once
        n += max((source.tensors[s].nbytes for s in plan.sources_used), default=0)
    return n


def describe(plan: Plan, layouts, source, dst, copies: list[Path], disk: int, bytes_in: int, peak: PeakRss) -> DryRunPlan:
    """The --dry-run report: output shards with their tensors, dtype changes, peak memory and disk estimates."""
    changes: dict[str, int] = {}
    for t in plan.tensors:
        if t.cast:
            key = f"{TORCH_NAMES[t.src_dtype]} -> {TORCH_NAMES[t.dtype]}"
            changes[key] = changes.get(key, 0) + 1
    peak.sample()
    return DryRunPlan(
        source=str(source.source),
        destination=str(dst),
        src_layout=plan.src_layout,
        layout=plan.layout,
        dtype=plan.dtype,
        dtype_changes=changes,
        tensors=len(plan.tensors),
        bytes_in=bytes_in,
        disk_bytes=disk,
        estimated_peak_rss_bytes=estimated_peak(plan, source, peak.peak),
        largest_tensor_bytes=max((t.nbytes for t in plan.tensors), default=0),
        outputs=[
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
        index=[str(Path(r.subdir) / INDEX_NAME) for r in plan.ranks],
        copied_files=[f.name for f in copies],
        ep_plan=plan.ep_plan,
        notes=list(source.notes),
    )
