"""Test helper: a Hugging Face hub cache laid out on disk exactly as huggingface_hub writes it.

    <cache>/models--org--name/
        blobs/<sha256 of the content>            the bytes, once per distinct content
        refs/<ref>                               the commit hash the ref points to (no newline)
        snapshots/<commit>/<path>                a RELATIVE link: ../../blobs/<sha> (../../../blobs/<sha> one folder down)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def repo_dir(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def add_snapshot(cache: Path, repo_id: str, src: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put every file under `src` into the cache as `repo_id` at `commit` (refs point to it); return the snapshot."""
    repo = repo_dir(cache, repo_id)
    snap = repo / "snapshots" / commit
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snap / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))  # relative, as huggingface_hub makes them
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


def fingerprint(root: Path) -> dict[str, tuple]:
    """Every entry under root (links not followed): (kind, link target or content hash) - to see nothing changed."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[rel] = ("other", os.lstat(p).st_mode)
    return out
