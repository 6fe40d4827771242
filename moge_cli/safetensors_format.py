"""The safetensors file format: a validating header reader and a header builder (no torch).

Layout of a file: 8-byte little-endian header length N, N bytes of JSON header, then the data
area. Header: {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
offsets relative to the start of the data area.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import NamedTuple

from moge_cli.errors import CheckpointError
from moge_cli.files import parse_json

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# safetensors dtype -> torch dtype name, and back.
TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip
FROM_TORCH_NAME = {v: k for k, v in TORCH_NAMES.items()}

# Dtypes the safetensors library knows and moge does not compute with (refused with that reason).
SAFETENSORS_ONLY_DTYPES = {"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "C64", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}

TORCH_SUFFIXES = (".bin", ".pt", ".pth")  # what `moge convert` reads as PyTorch state dicts
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's cap (MAX_HEADER_SIZE)
HEADER_MAX_DEPTH = 127  # serde_json's recursion limit, which the safetensors library parses headers with
U64 = 1 << 64
ALIGN = 8


class TensorInfo(NamedTuple):
    """Where one tensor's bytes live: file, dtype, shape and absolute byte range.

    A NamedTuple: the 72B checkpoint has ~10k of these and building them is on `moge load`'s start-up path.
    """

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; read no tensor data.

    Checks what the safetensors library checks (its `Metadata::validate` and `read_metadata`), so a file
    one refuses the other refuses too: header length within the file and at most 100,000,000 bytes,
    header UTF-8 JSON without a byte-order mark, nesting at most 127 deep, `__metadata__` a map of
    strings, every entry's dtype x shape equal to its byte span, and the spans, sorted by offsets,
    contiguous from 0 to the end of the file: no gap, no overlap, no trailing bytes ("file not fully
    covered": a header length off by one lands here). Dtypes moge cannot compute with (F4, C64...) are
    refused too. Raises CheckpointError naming the file and the problem.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if size < 8 or len(head) < 8:
                raise CheckpointError(f"{path}: {size} bytes, too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if (n > MAX_HEADER_BYTES or 8 + n > size) and _looks_like_pytorch(path, head):
                how = f"moge convert {path} OUT" if path.suffix in TORCH_SUFFIXES else f"name it {path.stem}.pt, then moge convert {path.stem}.pt OUT"
                raise CheckpointError(f"{path}: a PyTorch file (torch.save), not safetensors; convert it first: {how}")
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap; not a safetensors file")
            if 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the {size}-byte file (truncated?)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    header = parse_json(raw, f"{path}: header", strict_numbers=True)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; not a safetensors file")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(type(v) is str for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ is not a JSON object of strings")

    data_start, data_size = 8 + n, size - 8 - n
    tensors = {name: _entry(path, name, e, data_start, data_size) for name, e in header.items()}
    _check_coverage(path, tensors, data_start, data_size)
    return tensors, metadata


def _check_coverage(path: Path, tensors: dict[str, TensorInfo], data_start: int, data_size: int) -> None:
    """Spans sorted by (start, end) must tile the data area exactly, as the safetensors library requires."""
    spans = sorted((t.start, t.end, t.name) for t in tensors.values())
    pos = data_start
    for start, end, name in spans:
        if start != pos:
            what = "overlaps the tensor before it" if start < pos else f"leaves a {start - pos}-byte gap before it"
            raise CheckpointError(f"{path}: tensor {name!r} starts at data offset {start - data_start}: it {what} (safetensors refuses this: invalid offset)")
        pos = end
    if pos != data_start + data_size:
        raise CheckpointError(
            f"{path}: {data_start + data_size - pos} byte(s) after the last tensor's data: the file is not fully covered by its "
            f"header (a wrong header length, or bytes appended); safetensors refuses it"
        )


def _looks_like_pytorch(path: Path, head: bytes) -> bool:
    """A torch.save file: a zip (its default since 1.6) or a pickle (PROTO 2-5: the legacy format), or named like one."""
    return head.startswith((b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")) or path.suffix in TORCH_SUFFIXES


def _entry(path: Path, name: str, e: object, data_start: int, data_size: int) -> TensorInfo:
    """One header entry as a TensorInfo, or CheckpointError saying what is wrong with it.

    The checks run as one expression (this is `moge load`'s hot loop: ~10k entries on the 72B);
    only an entry that fails it, or carries keys besides the three, pays for `_entry_problem`.
    """
    try:
        dtype, shape, (begin, end) = e["dtype"], e["shape"], e["data_offsets"]  # type: ignore[index]
        ok = (
            len(e) == 3  # type: ignore[arg-type]
            and type(shape) is list
            and all(type(s) is int and s >= 0 for s in shape)
            and type(begin) is int
            and type(end) is int
            and 0 <= begin <= end <= data_size
            and math.prod(shape) * DTYPE_SIZES[dtype] == end - begin
            and (begin != end or _fits_u64(shape))
        )
    except (TypeError, KeyError, ValueError, IndexError):
        ok = False
    if not ok and (problem := _entry_problem(e, data_size)) is not None:
        raise CheckpointError(f"{path}: tensor {name!r}: {problem}")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


def _fits_u64(shape: list[int]) -> bool:
    """Whether every running product of `shape` fits a u64, as the safetensors library computes element counts."""
    n = 1
    for s in shape:
        n *= s
        if s >= U64 or n >= U64:
            return False
    return True


def _entry_problem(e: object, data_size: int) -> str | None:
    """What is wrong with a header entry that _entry's fast check rejected; None when it is fine after all
    (an entry with extra keys, which the safetensors library ignores when they nest at most 127 deep)."""
    if not isinstance(e, dict):
        return "header entry is not a JSON object"
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        return f"unknown dtype {dtype!r}" if dtype not in SAFETENSORS_ONLY_DTYPES else f"dtype {dtype} is not supported by moge"
    if type(shape) is not list or not all(type(s) is int and s >= 0 for s in shape):
        return f"shape {shape!r} is not a list of non-negative integers"
    if type(offsets) is not list or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        return f"data_offsets {offsets!r} is not [begin, end]"
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        return f"data_offsets [{begin}, {end}] fall outside the {data_size}-byte data area (truncated file?)"
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if expected != end - begin:
        return f"shape {shape} x {dtype} needs {expected} bytes but its span is {end - begin}"
    if not _fits_u64(shape):
        return f"shape {shape} overflows a 64-bit element count"
    extra = [v for k, v in e.items() if k not in ("dtype", "shape", "data_offsets")]
    if not _serde_accepts(extra, HEADER_MAX_DEPTH - 1):  # the list stands for the entry object, inside the header object
        return f"an extra key nests deeper than the {HEADER_MAX_DEPTH} levels a safetensors header allows, or holds a number out of range"
    return None


def _serde_accepts(value: object, max_depth: int) -> bool:
    """Whether serde_json would parse `value`: arrays/objects nest at most max_depth deep, and every
    integer fits a float (it reads those beyond 64 bits as f64). Walked without recursion."""
    todo = [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            if d > max_depth:
                return False
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
        elif type(v) is int and not -(1 << 1023) * 2 < v < (1 << 1023) * 2:
            return False
    return True


def build_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix included, padded to 8 bytes) for tensors written in this order.

    Returns (prefix_and_header, data_offsets) where data_offsets[i] is where tensor i starts in the
    data area; tensors are packed back to back.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offsets, pos = [], 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    return struct.pack("<Q", len(raw)) + raw, offsets
