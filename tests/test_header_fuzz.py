"""Property-based checks of the header and index parsers: on any mutation of a valid file, a clean error
(a MogeError naming the file) or a correct read, never another exception. Safetensors headers are also
compared with the safetensors library: it accepts exactly what moge accepts, and both read the same tensors.
Each property is bounded (max_examples, derandomized, no example database) to keep the suite quick."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moge_cli import open_checkpoint
from moge_cli.errors import MogeError
from moge_cli.files import parse_json
from moge_cli.safetensors_format import SAFETENSORS_ONLY_DTYPES, build_header, read_header

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-moge"
BOUNDED = settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

# A small valid file: several dtypes, an empty tensor, metadata; header padded with spaces as writers pad it.
ENTRIES = [("a", "F32", (2, 3)), ("empty", "BF16", (0, 4)), ("b", "BF16", (5,)), ("c", "U8", (3,)), ("d", "I64", (1,))]
HEAD, _ = build_header(ENTRIES, {"format": "pt"})
DATA = bytes(range(256))[: 24 + 0 + 10 + 3 + 8]
VALID = HEAD + DATA

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def byte_mutations(draw) -> bytes:
    """VALID with a few bytes overwritten, inserted or deleted, or its length prefix moved."""
    blob = bytearray(VALID)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["set", "insert", "delete", "length", "truncate", "append"]))
        i = draw(st.integers(0, len(blob) - 1)) if blob else 0
        if kind == "set" and blob:
            blob[i] = draw(st.sampled_from(b' "{}[],:0123456789-.eE\\u\x00\xff\xef' + bytes([draw(st.integers(0, 255))])))
        elif kind == "insert":
            blob[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and blob:
            del blob[i : i + draw(st.integers(1, 4))]
        elif kind == "length" and len(blob) >= 8:
            (n,) = struct.unpack("<Q", blob[:8])
            blob[:8] = struct.pack("<Q", max(0, n + draw(st.integers(-9, 9))))
        elif kind == "truncate":
            del blob[i:]
        else:
            blob += draw(st.binary(min_size=1, max_size=9))
    return bytes(blob)


@st.composite
def header_mutations(draw) -> bytes:
    """VALID's header as JSON with one entry's field changed, a key added or dropped, then re-serialized."""
    header = json.loads(HEAD[8:])
    name = draw(st.sampled_from(sorted(header)))
    entry = header[name]
    kind = draw(st.sampled_from(["offset", "shape", "dtype", "drop", "extra", "replace", "metadata"]))
    if kind == "offset" and name != "__metadata__":
        which = draw(st.integers(0, 1))
        entry["data_offsets"][which] += draw(st.integers(-9, 9))
    elif kind == "shape" and name != "__metadata__":
        entry["shape"] = draw(st.lists(st.integers(-2, 2**65), max_size=3))
    elif kind == "dtype" and name != "__metadata__":
        entry["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16", "U8", "I64", "BOOL", "f32", "", "Q7"]))
    elif kind == "drop" and isinstance(entry, dict) and entry:
        entry.pop(draw(st.sampled_from(sorted(entry))))
    elif kind == "extra" and isinstance(entry, dict):
        entry[draw(st.text(max_size=6))] = draw(json_values)
    elif kind == "replace":
        header[name] = draw(json_values)
    else:
        header["__metadata__"] = draw(json_values)
    raw = json.dumps(header, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    raw += b" " * draw(st.integers(0, 7))
    return struct.pack("<Q", len(raw)) + raw + DATA


def check_against_safetensors(blob: bytes) -> None:
    from safetensors import SafetensorError, safe_open

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        path.write_bytes(blob)
        try:
            ours = read_header(path)[0]
        except MogeError as e:
            assert str(path) in str(e)
            ours = None
        if any(code.encode() in blob for code in SAFETENSORS_ONLY_DTYPES):
            return  # dtypes the library knows and moge refuses on purpose
        try:
            with safe_open(str(path), "pt") as f:
                theirs = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()), f.get_tensor(k)) for k in f.keys()}
        except SafetensorError:
            theirs = None
        assert (ours is None) == (theirs is None), f"moge {'refuses' if ours is None else 'accepts'}, safetensors does not"
        if ours is not None:
            assert set(ours) == set(theirs)
            for name, info in ours.items():
                dtype, shape, tensor = theirs[name]
                assert (info.dtype, info.shape) == (dtype, shape)
                assert blob[info.start : info.end] == tensor.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()


@BOUNDED
@given(byte_mutations())
def test_mutated_bytes_read_or_refused_like_safetensors(blob):
    check_against_safetensors(blob)


@BOUNDED
@given(header_mutations())
def test_mutated_headers_read_or_refused_like_safetensors(blob):
    check_against_safetensors(blob)


@BOUNDED
@given(st.binary(max_size=64) | st.text(max_size=32).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_parse_json_never_raises_anything_but_a_moge_error(raw):
    try:
        parse_json(raw, "f.json")
    except MogeError as e:
        assert str(e).startswith("f.json: ")


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fuzz") / "ck"
    shutil.copytree(FIXTURE, d)
    return d


INDEX = "model.safetensors.index.json"
INDEX_TEXT = (FIXTURE / INDEX).read_text()
NAMES = st.text(max_size=12) | st.sampled_from(["../x", "/etc/passwd", "a\x00b", "\ud800", "", ".", "sub/x.safetensors", "model-00001-of-00003.safetensors"])


RAW_TOKENS = [b"[" * 2000 + b"]" * 2000, b"9" * 5000, b"NaN", b'"\\ud800"', b'{"weight_map": {"a": "x\\u0000"}}', b"BOM"]


@st.composite
def index_mutations(draw) -> bytes:
    index = json.loads(INDEX_TEXT)
    kind = draw(st.sampled_from(["shard", "tensor", "drop", "weight_map", "metadata", "bytes", "raw"]))
    wm = index["weight_map"]
    key = draw(st.sampled_from(sorted(wm)))
    if kind == "shard":
        wm[key] = draw(NAMES | json_values)
    elif kind == "tensor":
        wm[draw(NAMES)] = wm.pop(key)
    elif kind == "drop":
        del wm[key]
    elif kind == "weight_map":
        index["weight_map"] = draw(json_values)
    elif kind == "metadata":
        index["metadata"] = draw(json_values)
    raw = json.dumps(index, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if kind == "bytes":
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + draw(st.binary(max_size=3)) + raw[i + draw(st.integers(0, 3)) :]
    elif kind == "raw":  # what json.dumps cannot write: Python's parser limits, a BOM, escapes for lone surrogates and NUL
        token = draw(st.sampled_from(RAW_TOKENS))
        raw = b"\xef\xbb\xbf" + raw if token == b"BOM" else raw.replace(b'"metadata": ', b'"metadata": ' + token + b", \"x\": ", 1)
    return raw


@BOUNDED
@given(index_mutations())
def test_mutated_index_opens_or_is_a_clear_error(ck, raw):
    (ck / INDEX).write_bytes(raw)
    try:
        ckpt = open_checkpoint(ck)
    except MogeError as e:
        assert str(ck) in str(e)
        return
    index = json.loads(raw)  # it opened: the index it read is JSON that maps every tensor to the shard holding it
    assert all(ckpt.tensors[n].file.name == Path(f).name for n, f in index["weight_map"].items())
