"""`convert --verify`: re-read the written output with the checkpoint reader and compare it with the source.

Every output tensor must have the planned dtype and shape, and its bytes must equal its recipe
applied to the source: the same bytes for a copy / stack / split, or `cast_exact` of the source
values for a cast. Compared in fixed-size chunks, so memory stays flat. Copies are compared as bytes;
torch is imported only to recompute casts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moge_cli.checkpoint import open_checkpoint
from moge_cli.errors import MogeError
from moge_cli.safetensors_format import DTYPE_SIZES

from moge_converters.plan import OutTensor
from moge_converters.shards import METADATA

COMPARE_BYTES = 16 * 1024 * 1024


class VerifyError(MogeError):
    """The written output does not match the expected transform of its source."""

    exit_code = 1


def same_bytes(a: memoryview, b: memoryview) -> bool:
    if len(a) != len(b):
        return False
    for i in range(0, len(a), COMPARE_BYTES):
        j = min(len(a), i + COMPARE_BYTES)
        if not np.array_equal(np.frombuffer(a[i:j], np.uint8), np.frombuffer(b[i:j], np.uint8)):
            return False
    return True


def tensor_matches(source, t: OutTensor, out: memoryview, clamp: bool) -> bool:
    """Whether `out` (the written bytes of t) equals t's recipe applied to the source."""
    if len(out) != t.nbytes:
        return False
    in_size, out_size = DTYPE_SIZES[t.src_dtype], DTYPE_SIZES[t.dtype]
    pos = 0
    for part in t.parts:
        n = part.count * out_size
        if t.cast:
            ok = _cast_matches(source.flat(part.source)[part.start : part.start + part.count], t.dtype, clamp, out[pos : pos + n])
        else:
            ok = same_bytes(source.raw(part.source)[part.start * in_size : part.start * in_size + n], out[pos : pos + n])
        if not ok:
            return False
        pos += n
    return pos == len(out)


def _cast_matches(x, code: str, clamp: bool, out: memoryview) -> bool:
    """Whether `out` holds cast_exact of the 1-D source tensor x to dtype `code`, compared CHUNK_ELEMS at a time."""
    from moge_converters.cast import CHUNK_ELEMS, byte_view, cast_exact, torch_dtype  # torch: casts are recomputed

    dtype, size = torch_dtype(code), DTYPE_SIZES[code]
    for a in range(0, x.numel(), CHUNK_ELEMS):
        want = byte_view(cast_exact(x[a : a + CHUNK_ELEMS], dtype, clamp))
        if not same_bytes(want, out[a * size : a * size + len(want)]):
            return False
    return True


def verify_output(source, layouts, tmp: Path, clamp: bool) -> None:
    """Raise VerifyError listing every output tensor (or file) that differs from the plan."""
    bad: list[str] = []
    for rank, shards in layouts:
        out_dir = tmp / rank.subdir
        where = f"{rank.subdir}/" if rank.subdir else ""
        ck = open_checkpoint(out_dir)  # re-validates every header, offset and the index
        try:
            planned = {t.name: t for s in shards for t in s.tensors}
            for name in sorted(set(ck.tensors) ^ set(planned)):
                bad.append(f"{where}{name}: {'not planned' if name in ck.tensors else 'missing from the output'}")
            for f, meta in ck.file_metadata.items():
                if meta != METADATA:
                    bad.append(f"{where}{f.name}: metadata {meta}, expected {METADATA}")
            if json.loads((out_dir / "config.json").read_text()) != rank.config:
                bad.append(f"{where}config.json: differs from the planned config")
            for name, t in planned.items():
                info = ck.tensors.get(name)
                if info is None:
                    continue
                if info.dtype != t.dtype or info.shape != t.shape:
                    bad.append(f"{where}{name}: {info.dtype} {list(info.shape)}, planned {t.dtype} {list(t.shape)}")
                elif not tensor_matches(source, t, ck.raw(name), clamp):
                    bad.append(f"{where}{name}: values differ from the {'cast of the ' if t.cast else ''}source ({t.recipe()})")
        finally:
            ck.close()
    if bad:
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise VerifyError(f"verification failed for {len(bad)} item(s): {'; '.join(bad[:10])}{more}; nothing was written")
