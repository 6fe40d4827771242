"""`load --verify`: one sequential pass over every shard: sha256, NaN/Inf counts, all-zero tensors.

numpy only (no torch), reading each file front to back in fixed-size chunks, so memory stays flat.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from moge_cli.checkpoint import Checkpoint
from moge_cli.errors import UsageError
from moge_cli.files import read_json
from moge_cli.problems import Problem
from moge_cli.safetensors_format import TensorInfo

CHUNK = 16 * 1024 * 1024  # bytes read at a time; a multiple of every element size

# Floating dtypes viewed as unsigned ints: (int view, exponent mask, mantissa mask).
_BITS = {
    "BF16": (np.uint16, 0x7F80, 0x007F),
    "F16": (np.uint16, 0x7C00, 0x03FF),
    "F32": (np.uint32, 0x7F800000, 0x007FFFFF),
    "F64": (np.uint64, 0x7FF0000000000000, 0x000FFFFFFFFFFFFF),
}


@dataclass
class TensorStats:
    nan: int = 0
    inf: int = 0
    nonzero: bool = False


@dataclass
class VerifyResult:
    hashes: dict[str, str] = field(default_factory=dict)  # shard file name -> sha256 hex
    sizes: dict[str, int] = field(default_factory=dict)
    stats: dict[str, TensorStats] = field(default_factory=dict)

    @property
    def problems(self) -> list[Problem]:
        out = []
        for name, s in self.stats.items():
            if s.nan or s.inf:
                out.append(Problem("nonfinite", name, f"{s.nan} NaN and {s.inf} Inf values"))
            if not s.nonzero:
                out.append(Problem("zero", name, "every value is zero"))
        return out

    def summary(self) -> dict:
        return {
            "files": {f: {"sha256": h, "bytes": self.sizes[f]} for f, h in self.hashes.items()},
            "tensors_checked": len(self.stats),
            "nan": sum(s.nan for s in self.stats.values()),
            "inf": sum(s.inf for s in self.stats.values()),
            "all_zero_tensors": sum(not s.nonzero for s in self.stats.values()),
        }


def _update(stats: TensorStats, dtype: str, chunk: bytes) -> None:
    bits = _BITS.get(dtype)
    if bits is None:  # integer / bool / fp8: only the all-zero check applies
        stats.nonzero = stats.nonzero or any(chunk)
        return
    view, exp_mask, man_mask = bits
    u = np.frombuffer(chunk, dtype=view)
    special = (u & view(exp_mask)) == view(exp_mask)
    if special.any():
        man = u[special] & view(man_mask)
        stats.nan += int(np.count_nonzero(man))
        stats.inf += int(man.size - np.count_nonzero(man))
    # +0.0 and -0.0 are both zero: ignore the sign bit.
    stats.nonzero = stats.nonzero or bool(np.any(u & ~view(1 << (u.itemsize * 8 - 1))))


def verify_checkpoint(ckpt: Checkpoint, progress: Callable[[int, int], None] | None = None) -> VerifyResult:
    """Stream every shard once: hash the whole file and compute per-tensor stats on the way."""
    result = VerifyResult()
    total = ckpt.size_bytes
    for path in ckpt.files:
        by_start: list[TensorInfo] = sorted((t for t in ckpt.tensors.values() if t.file == path), key=lambda t: t.start)
        h, pos = hashlib.sha256(), 0
        with open(path, "rb") as f:

            def feed(upto: int, info: TensorInfo | None = None) -> None:
                nonlocal pos
                while pos < upto:
                    chunk = f.read(min(CHUNK, upto - pos))
                    if not chunk:
                        raise OSError(f"{path}: file ended at byte {pos} while reading")
                    h.update(chunk)
                    if info is not None:
                        _update(result.stats[info.name], info.dtype, chunk)
                    pos += len(chunk)
                    if progress:
                        progress(len(chunk), total)

            for info in by_start:
                feed(info.start)
                result.stats[info.name] = TensorStats()
                feed(info.end, info)
            feed(path.stat().st_size)
        result.hashes[path.name] = h.hexdigest()
        result.sizes[path.name] = pos
    return result


def write_manifest(result: VerifyResult, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"files": result.summary()["files"]}, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def check_manifest(result: VerifyResult, path: Path) -> list[Problem]:
    """Problems of kind 'hash' for every shard whose hash or presence differs from the manifest."""
    try:
        files = read_json(path, error=UsageError)["files"]
        expected = {name: entry["sha256"] for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: not a moge manifest ({e})") from None
    out = []
    for name, digest in expected.items():
        got = result.hashes.get(name)
        if got is None:
            out.append(Problem("hash", name, "listed in the manifest but not in the checkpoint"))
        elif got != digest:
            out.append(Problem("hash", name, f"sha256 {got[:16]}... differs from the manifest's {digest[:16]}..."))
    for name in result.hashes:
        if name not in expected:
            out.append(Problem("hash", name, "in the checkpoint but not in the manifest"))
    return out
