"""The one rule for the files of a checkpoint directory: which links may be followed, what may be opened.

Every file the toolkit reads or copies out of a checkpoint directory (shards, indexes, config.json,
tokenizer files, chat templates, generation_config.json, README, LICENSE...) goes through
`checked_file` first:

- a symlink (the file itself, or a directory on its way) may lead anywhere inside the checkpoint
  directory, or, when that directory is a Hugging Face cache snapshot
  (`.../models--org--name/snapshots/<commit>/`, or a folder in one), into the `blobs/` directory of
  that same repo, where huggingface_hub keeps the bytes its snapshot links point to;
- where it ends must be a regular file: a FIFO, socket or device is refused before anything opens
  it (opening a FIFO waits for a writer that never comes);
- anything else (a link leading elsewhere, a dangling link, a link loop) is refused with a
  CheckpointError naming the file and where it leads.

A file the user names on the command line (`moge load some/link.safetensors`) is theirs: only
`checked_named_file`'s regular-file and loop checks apply to it, not the directory rule; the
files found beside it are checked against its directory.

Every JSON file of a checkpoint (config.json, the index, tokenizer and generation configs, a
safetensors header) is parsed by `parse_json` / `read_json`: UTF-8 without a byte-order mark, no lone
surrogates, and nesting too deep or a number too long for Python become a clear error naming the file.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from moge_cli.errors import CheckpointError, MogeError

HUB_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


def snapshot_blobs(root: str | os.PathLike) -> Path | None:
    """The `blobs/` directory of the Hugging Face cache repo whose snapshot holds `root`, or None.

    `root` (followed to where it really is) must be a snapshot `<repo>/snapshots/<commit>` or a folder
    inside one, where <repo> is a cache folder such as `models--org--name`.
    """
    real = Path(os.path.realpath(root))
    for d in (real, *real.parents):
        if d.parent.name == "snapshots" and d.parent.parent.name.startswith(HUB_REPO_PREFIXES):
            return Path(os.path.realpath(d.parent.parent / "blobs"))
    return None


def checked_file(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """`path` (a file in the checkpoint directory `root`, e.g. root / "config.json"), checked by the rule
    above; returned unchanged. Raises CheckpointError (exit code 2) naming the file otherwise."""
    root, path = Path(root), Path(path)
    try:
        rel = path.relative_to(root)
    except ValueError:
        rel = None
    if rel is None or rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise CheckpointError(f"{path}: points outside the checkpoint directory {root}")
    real_root = Path(os.path.realpath(root))
    target = Path(os.path.realpath(path))
    st = _stat(path, target)
    blobs = snapshot_blobs(root)
    if not (target.is_relative_to(real_root) or (blobs is not None and target.is_relative_to(blobs))):
        where = f"the checkpoint directory {real_root}" + (f" and its Hugging Face cache blobs {blobs}" if blobs else "")
        raise CheckpointError(f"{path}: is a link that leads to {target}, outside {where}; refusing to follow it")
    if st is None:
        raise CheckpointError(f"{path}: is a link to {target}, which does not exist")
    _require_regular(path, st, target)
    return path


def checked_named_file(path: str | os.PathLike) -> Path:
    """A file the user named: it must exist and be a regular file (after links, which must not loop)."""
    path = Path(path)
    st = _stat(path, Path(os.path.realpath(path)))
    if st is None:
        raise CheckpointError(f"{path}: is a link to {os.path.realpath(path)}, which does not exist")
    _require_regular(path, st, Path(os.path.realpath(path)))
    return path


def checked_dir(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """A folder of the checkpoint (an expert-parallel rank directory): after links, a directory inside root."""
    root, path = Path(root), Path(path)
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(os.path.realpath(root)):
        raise CheckpointError(f"{path}: is a link that leads to {target}, outside the checkpoint directory {os.path.realpath(root)}; refusing to follow it")
    if not target.is_dir():
        raise CheckpointError(f"{path}: {'not a directory' if os.path.lexists(path) else 'no such directory'}")
    return path


def present(root: str | os.PathLike, name: str) -> bool:
    """Whether anything (file, link, even a broken one, FIFO...) is named `name` in root: then it is read and must pass."""
    return os.path.lexists(Path(root) / name)


def optional_file(root: str | os.PathLike, name: str) -> Path | None:
    """root / name checked by the rule, or None when nothing by that name is there."""
    return checked_file(root, Path(root) / name) if present(root, name) else None


def _stat(path: Path, target: Path) -> os.stat_result | None:
    """os.stat(path) (follows links, opens nothing); None for a dangling link; CheckpointError for a loop."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.lexists(path):
            return None
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path}: is a symlink loop (its links lead back to themselves, via {target}); not a file") from None
        if e.errno == errno.ENOTDIR:
            raise CheckpointError(f"{path}: a component of the path is not a directory") from None
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None


def _require_regular(path: Path, st: os.stat_result, target: Path) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    kind = (
        "a directory" if stat.S_ISDIR(st.st_mode)
        else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode)
        else "a socket" if stat.S_ISSOCK(st.st_mode)
        else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
        else "not a regular file"
    )  # fmt: skip
    via = f" (a link to {target})" if os.path.islink(path) else ""
    raise CheckpointError(f"{path}: is {kind}{via}, not a regular file; refusing to read it")


# A \uD800-\uDFFF escape: maybe half of a valid pair, maybe a lone surrogate (which no UTF-8 text holds).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_NEGATIVE_ZERO = re.compile(r"-0(?![0-9.eE])")
_NOT_UTF8 = {b"\xef\xbb\xbf": "a UTF-8 byte-order mark", b"\xff\xfe": "a UTF-16 byte-order mark", b"\xfe\xff": "a UTF-16 byte-order mark"}


def parse_json(raw: bytes, where: str | os.PathLike, *, error: type[MogeError] = CheckpointError, strict_numbers: bool = False) -> Any:
    """The JSON value in `raw`, or `error` naming `where` and what is wrong.

    Accepted: UTF-8 text without a byte-order mark (RFC 8259; UTF-16 and BOMs are refused, as by the
    safetensors library and Hugging Face's readers), no lone surrogate escapes (they cannot become file
    names or UTF-8 output). Nesting too deep for Python's parser, NaN/Infinity, and integers over Python's
    4300-digit limit are errors, not exceptions. strict_numbers: read numbers as serde_json does for
    safetensors headers: one that overflows a float (1e400) is an error, and `-0` is a float, not the integer 0.
    """
    for mark, what in _NOT_UTF8.items():
        if raw.startswith(mark):
            raise error(f"{where}: starts with {what}; expected UTF-8 JSON without one")
    if raw[:1] == b"\x00" or raw[1:2] == b"\x00":
        raise error(f"{where}: starts with NUL bytes (UTF-16 or UTF-32 text?); expected UTF-8 JSON")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    # serde_json reads `-0` as a signed integer, which no size or offset takes: keep it apart from 0 (one memchr first)
    negative_zero = strict_numbers and "-" in text and _NEGATIVE_ZERO.search(text) is not None
    try:
        value = json.loads(
            text, parse_constant=_no_constant, parse_float=_finite_float if strict_numbers else None,
            parse_int=_int_not_negative_zero if negative_zero else None,
        )  # fmt: skip
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply for a checkpoint file") from None
    except ValueError as e:  # JSONDecodeError, NaN, or int() refusing a number of over 4300 digits
        if "integer string conversion" in str(e):
            raise error(f"{where}: holds a number over {_max_digits()} digits long; not a checkpoint file") from None
        raise error(f"{where}: not valid JSON ({e})") from None
    # `"\\" in text` is one memchr: most files hold no escape at all, and the regex costs 0.3 ms per MB
    if "\\" in text and _SURROGATE_ESCAPE.search(text) and (bad := _lone_surrogate(value)) is not None:
        raise error(f"{where}: string {bad!r} holds a lone surrogate escape; not valid Unicode text")
    return value


def read_json(path: str | os.PathLike, *, error: type[MogeError] = CheckpointError) -> Any:
    """parse_json of a file's bytes; an unreadable file is `error` too."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    return parse_json(raw, path, error=error)


def _int_not_negative_zero(s: str) -> int | float:
    return -0.0 if s == "-0" else int(s)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"number {s[:40]} is out of range")
    return v


def _max_digits() -> int:
    import sys

    return sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 4300


def _lone_surrogate(value: Any) -> str | None:
    """The first string (key or value) in `value` that UTF-8 cannot encode, or None (walked without recursion)."""
    todo = [value]
    while todo:
        v = todo.pop()
        items = v.items() if isinstance(v, dict) else [(None, x) for x in v] if isinstance(v, list) else [(None, v)]
        for k, x in items:
            for s in (k, x):
                if isinstance(s, str):
                    try:
                        s.encode("utf-8")
                    except UnicodeEncodeError:
                        return s
            if isinstance(x, (dict, list)):
                todo.append(x)
    return None
