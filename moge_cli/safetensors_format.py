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

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's cap
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

    Raises CheckpointError naming the file and the problem for anything that does not add up:
    short file, header length past the end or over the cap, invalid JSON, unknown dtype,
    shape x dtype size != byte span, spans outside the data area or overlapping.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if size < 8 or len(head) < 8:
                raise CheckpointError(f"{path}: {size} bytes, too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES}-byte cap; not a safetensors file?")
            if 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the {size}-byte file (truncated?)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e}); not a safetensors file?") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ is not a JSON object")

    data_start, data_size = 8 + n, size - 8 - n
    tensors = {name: _entry(path, name, e, data_start, data_size) for name, e in header.items()}
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the data area")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _entry(path: Path, name: str, e: object, data_start: int, data_size: int) -> TensorInfo:
    """One header entry as a TensorInfo, or CheckpointError saying what is wrong with it.

    The checks run as one expression (this is `moge load`'s hot loop: ~10k entries on the 72B);
    only a failing entry pays for `_entry_problem` to say which check failed.
    """
    try:
        dtype, shape, (begin, end) = e["dtype"], e["shape"], e["data_offsets"]  # type: ignore[index]
        ok = (
            type(shape) is list
            and all(type(s) is int and s >= 0 for s in shape)
            and type(begin) is int
            and type(end) is int
            and 0 <= begin <= end <= data_size
            and math.prod(shape) * DTYPE_SIZES[dtype] == end - begin
        )
    except (TypeError, KeyError, ValueError, IndexError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: tensor {name!r}: {_entry_problem(e, data_size)}")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


def _entry_problem(e: object, data_size: int) -> str:
    """What is wrong with a header entry that _entry rejected."""
    if not isinstance(e, dict):
        return "header entry is not a JSON object"
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        return f"unknown dtype {dtype!r}"
    if type(shape) is not list or not all(type(s) is int and s >= 0 for s in shape):
        return f"shape {shape!r} is not a list of non-negative integers"
    if type(offsets) is not list or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        return f"data_offsets {offsets!r} is not [begin, end]"
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        return f"data_offsets [{begin}, {end}] fall outside the {data_size}-byte data area (truncated file?)"
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    return f"shape {shape} x {dtype} needs {expected} bytes but its span is {end - begin}"


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
