"""Checkpoint reader: finds the shards, validates headers and index, gives lazy tensor access.

Reads no tensor data until asked; `tensor()` memory-maps. torch is imported only there.
"""

from __future__ import annotations

import functools
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moge_cli.config import MoGEConfig
from moge_cli.errors import CheckpointError
from moge_cli.files import checked_file, checked_named_file, optional_file, present, read_json
from moge_cli.names import detect_layout, layer_of
from moge_cli.safetensors_format import TORCH_NAMES, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
TORCH_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth")  # the PyTorch files `moge convert DIR` reads
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Checkpoint:
    """A validated checkpoint: config, tensor locations, files. Tensor data stays on disk."""

    root: Path  # directory holding config.json
    source: Path  # what the user's path resolved to: root, or a single .safetensors file
    config: MoGEConfig
    tensors: dict[str, TensorInfo]  # name -> location, in file order
    files: list[Path]  # weight files, in order
    index_path: Path | None = None
    index_total_size: int | None = None
    unindexed: list[str] = field(default_factory=list)  # in a shard but not in the index
    file_metadata: dict[Path, dict[str, str]] = field(default_factory=dict)
    _maps: dict[Path, mmap.mmap] = field(default_factory=dict, repr=False)

    @functools.cached_property
    def layout(self) -> str:
        return detect_layout(set(self.tensors))

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def layer_names(self, layer: int) -> list[str]:
        return [n for n in self.tensors if layer_of(n) == layer]

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes, memory-mapped (no copy, no torch)."""
        info = self._info(name)
        return memoryview(self._map(info.file))[info.start : info.end]

    def tensor(self, name: str) -> Any:
        """The tensor as a torch.Tensor backed by a private memory map (copy-on-write; the file is never modified)."""
        import torch

        info = self._info(name)
        dtype = getattr(torch, TORCH_NAMES[info.dtype])
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        flat = torch.frombuffer(self._map(info.file), dtype=torch.uint8, offset=info.start, count=info.nbytes)
        if info.start % flat.new_empty((), dtype=dtype).element_size():
            flat = flat.clone()  # misaligned in the file: copy so the dtype view is legal
        return flat.view(dtype).reshape(info.shape)

    def layer(self, layer: int) -> dict[str, Any]:
        """One decoder layer's tensors, memory-mapped."""
        return {n: self.tensor(n) for n in self.layer_names(layer)}

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a tensor still views it; the OS unmaps when it goes
                pass
        self._maps.clear()

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.root}: no tensor named {name!r}") from None

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[path]


def open_checkpoint(path: str | os.PathLike, *, revision: str | None = None) -> Checkpoint:
    """Resolve `path` (directory, .safetensors file, or cached Hugging Face repo id), validate, return it.

    Raises ConfigError / CheckpointError (exit code 2) for anything unreadable or untrustworthy.
    """
    source, files, index = _resolve(path, revision)
    root = source if source.is_dir() else source.parent
    # A file the user named must be safetensors before the config.json beside it matters (`moge load /etc/passwd`).
    headers = {} if source.is_dir() else {source: read_header(source)}
    config = MoGEConfig.from_file(optional_file(root, "config.json") or root / "config.json")
    weight_map: dict[str, str] = {}
    if index is not None:
        weight_map, total_size = _read_index(index)
        files = _index_files(root, index, weight_map)
    ckpt = Checkpoint(root=root, source=source, config=config, tensors={}, files=files, index_path=index)
    owner: dict[str, str] = {}  # tensor name -> shard file name
    for f in files:
        tensors, meta = headers.pop(f, None) or read_header(f)
        ckpt.file_metadata[f] = meta
        fname = f.relative_to(root).as_posix()
        for name in tensors:
            if name in owner:
                raise CheckpointError(f"{root}: tensor {name!r} is stored in two shards, {owner[name]} and {fname}")
            owner[name] = fname
        ckpt.tensors.update(tensors)
    if index is not None:
        ckpt.index_total_size = total_size
        for name, fname in weight_map.items():
            if name not in owner:
                raise CheckpointError(f"{index}: tensor {name!r} is indexed in {fname} but that shard does not hold it")
            if owner[name] != fname:
                raise CheckpointError(f"{index}: tensor {name!r} is indexed in {fname} but stored in {owner[name]}")
        ckpt.unindexed = [n for n in owner if n not in weight_map]
    return ckpt


def resolve_location(path: str | os.PathLike, revision: str | None = None) -> Path:
    """The file or directory `path` names: a local path, or the cache snapshot of a Hugging Face repo id
    (`org/name`, at `revision`; the cache only, never the network). --revision is for repo ids only."""
    p = Path(path)
    if os.path.lexists(p):
        if revision is not None:
            raise CheckpointError(f"{path}: --revision applies to Hugging Face repo ids, not local paths")
        return p
    if REPO_ID_RE.match(str(path)) and not str(path).startswith((".", "/")):
        return resolve_hub_repo(str(path), revision)
    raise CheckpointError(f"{path}: no such file or directory")


def _resolve(path: str | os.PathLike, revision: str | None) -> tuple[Path, list[Path], Path | None]:
    """(source file or directory, weight files, index file or None); every file checked by moge_cli.files."""
    p = resolve_location(path, revision)
    if not p.is_dir():  # a file the user named (a link, a FIFO, a loop are said so here)
        checked_named_file(p)
        if p.stat().st_size == 0:
            raise CheckpointError(f"{p}: empty file (0 bytes); not a safetensors file")
        return p, [p], None
    if present(p, INDEX_NAME):
        return p, [], checked_file(p, p / INDEX_NAME)  # the files come from the index
    if present(p, SINGLE_NAME):
        return p, [checked_file(p, p / SINGLE_NAME)], None
    shards = sorted(p.glob("*.safetensors"))
    if shards:
        return p, [checked_file(p, f) for f in shards], None
    if torch_files := sorted(f.name for pattern in TORCH_PATTERNS for f in p.glob(pattern)):
        raise CheckpointError(f"{p}: holds PyTorch weights ({', '.join(torch_files[:3])}{', ...' if len(torch_files) > 3 else ''}), not safetensors; convert them first: moge convert {p} OUT")
    raise CheckpointError(f"{p}: no {INDEX_NAME}, {SINGLE_NAME} or *.safetensors file here")


def _read_index(index: Path) -> tuple[dict[str, str], int | None]:
    """(weight_map, metadata.total_size or None) of an index file."""
    data = read_json(index)
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CheckpointError(f"{index}: no 'weight_map' object mapping tensor names to shard files")
    meta = data.get("metadata")
    total = meta.get("total_size") if isinstance(meta, dict) else None
    return wm, (total if isinstance(total, int) and not isinstance(total, bool) else None)


def _index_files(root: Path, index: Path, weight_map: dict[str, str]) -> list[Path]:
    """The shard files an index names, each checked by moge_cli.files (inside `root`, regular files)."""
    files: list[Path] = []
    for fname in sorted(set(weight_map.values())):
        if "\x00" in fname or not fname:
            raise CheckpointError(f"{index}: shard name {fname!r} is empty or holds a NUL byte; no file can have that name")
        rel = Path(fname)
        if rel.is_absolute() or ".." in rel.parts or fname.startswith(("/", "\\")):
            raise CheckpointError(f"{index}: shard path {fname!r} points outside the checkpoint directory")
        f = root / rel
        if not os.path.lexists(f):
            raise CheckpointError(f"{index}: names shard {fname!r}, which does not exist in {root}")
        files.append(checked_file(root, f))
    return files


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps its repos, read from the environment now (huggingface_hub reads it
    once, at import): $HF_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME or ~/.cache, /huggingface/hub."""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
        cache = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def resolve_hub_repo(repo_id: str, revision: str | None) -> Path:
    """Directory of a Hugging Face repo snapshot in the local cache (`hub_cache_dir()`); never touches the network.

    revision: a branch or tag (looked up in the repo's refs/) or a commit hash; default main.
    The snapshot's files are links into the repo's blobs/ (moge_cli.files allows exactly that).
    """
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    rev = f" --revision {revision}" if revision else ""
    if revision is not None and (not revision or revision.startswith("/") or ".." in revision.split("/")):
        raise CheckpointError(f"{repo_id}: --revision {revision!r} is not a branch, tag or commit name")
    try:
        snap = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError / IncompleteSnapshotError are OSErrors, HFValidationError a ValueError
        snap = None
    if snap is None or not snap.is_dir():
        raise CheckpointError(
            f"{repo_id}: not a local path, and not in the Hugging Face cache {cache} (revision {revision or 'main'}); "
            f"download it first with: hf download {repo_id}{rev}"
        )
    return snap
