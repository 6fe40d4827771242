"""Conversion sources: a safetensors checkpoint (through the reader) or a PyTorch state dict, one interface.

Both give `config_dict`, `tensors` (name -> TensorInfo, in file order), `flat(name)` (a 1-D tensor
backed by the file), `raw(name)` (its bytes) and `file_range(name)` ((path, offset) of the bytes in a
file, for sendfile; None for PyTorch files), plus `root` and `close()`.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any

from moge_cli.checkpoint import Checkpoint, open_checkpoint, resolve_location
from moge_cli.errors import CheckpointError, ConfigError
from moge_cli.files import checked_file, checked_named_file, present, read_json
from moge_cli.safetensors_format import TORCH_SUFFIXES

BIN_INDEX = "pytorch_model.bin.index.json"

# Non-weight files copied unchanged (config.json is rewritten, weights and indexes are regenerated).
COPY_PATTERNS = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "generation_config.json", "chat_template.jinja", "*.py", "README*", "LICENSE*",
)  # fmt: skip


class SafetensorsSource:
    """A validated safetensors checkpoint; tensor bytes are read where they lie (mmap / sendfile)."""

    direct = True
    notes: list[str] = []

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.root, self.source, self.files, self.tensors = ckpt.root, ckpt.source, ckpt.files, ckpt.tensors
        config = checked_file(ckpt.root, ckpt.root / "config.json")  # checked when the checkpoint opened; again, as read
        self.config_dict: dict[str, Any] = read_json(config, error=ConfigError)

    def flat(self, name: str):
        return self.ckpt.tensor(name).reshape(-1)

    def raw(self, name: str) -> memoryview:
        return self.ckpt.raw(name)

    def file_range(self, name: str) -> tuple[Path, int]:
        info = self.tensors[name]
        return info.file, info.start

    def close(self) -> None:
        self.ckpt.close()


def open_source(path: str | os.PathLike, *, revision: str | None = None):
    """A safetensors or PyTorch checkpoint at `path` (directory, file, or cached Hugging Face repo id at
    `revision`), validated."""
    p = resolve_location(path, revision)
    found = torch_files(p)
    if found is not None:
        from moge_converters.torch_input import TorchSource  # torch reads PyTorch files: imported only for them

        return TorchSource(*found, source=p)
    return SafetensorsSource(open_checkpoint(p))


def torch_files(path: Path) -> tuple[Path, list[Path], tuple[Path, dict[str, str]] | None] | None:
    """(root, weight files, (index file, its weight_map) or None) for a PyTorch checkpoint (file, or directory
    without safetensors), else None. Every file is checked by moge_cli.files."""
    if not path.is_dir():
        return (path.parent, [checked_named_file(path)], None) if path.suffix in TORCH_SUFFIXES else None
    if list(path.glob("*.safetensors")):
        return None
    if present(path, BIN_INDEX):
        index = checked_file(path, path / BIN_INDEX)
        files, weight_map = _indexed_files(path, index)
        return path, files, (index, weight_map)
    files = sorted(path.glob("pytorch_model*.bin")) or sorted(p for s in (".pt", ".pth") for p in path.glob(f"*{s}"))
    return (path, [checked_file(path, f) for f in files], None) if files else None


def _indexed_files(root: Path, index: Path) -> tuple[list[Path], dict[str, str]]:
    """The .bin files a pytorch_model.bin.index.json names: regular files inside root (moge_cli.files)."""
    try:
        weight_map = read_json(index)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a valid index ({e})") from None
    files = []
    for name in names:
        f = root / str(name)
        if not isinstance(name, str) or "\x00" in name or not name:
            raise CheckpointError(f"{index}: file name {name!r} is empty or holds a NUL byte; no file can have that name")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{index}: file {name!r} points outside the checkpoint directory")
        if not os.path.lexists(f):
            raise CheckpointError(f"{index}: names {name!r}, which does not exist in {root}")
        files.append(checked_file(root, f))
    return files, weight_map


def files_to_copy(root: Path) -> list[Path]:
    """The non-weight files of a checkpoint directory that the output gets unchanged, each checked by
    moge_cli.files (a link leading out of the checkpoint, a FIFO, a loop: refused). Directories are skipped."""
    names = sorted(p for p in root.iterdir() if any(fnmatch.fnmatchcase(p.name, pat) for pat in COPY_PATTERNS))
    return [checked_file(root, p) for p in names if p.is_symlink() or not p.is_dir()]
