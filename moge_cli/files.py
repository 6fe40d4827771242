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
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from moge_cli.errors import CheckpointError

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
