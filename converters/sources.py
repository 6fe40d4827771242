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
from moge_cli.errors import ConfigError
from moge_cli.files import checked_file, read_json

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
    from moge_converters.torch_input import TorchSource, torch_files

    p = resolve_location(path, revision)
    found = torch_files(p)
    if found is not None:
        return TorchSource(*found, source=p)
    return SafetensorsSource(open_checkpoint(p))


def files_to_copy(root: Path) -> list[Path]:
    """The non-weight files of a checkpoint directory that the output gets unchanged, each checked by
    moge_cli.files (a link leading out of the checkpoint, a FIFO, a loop: refused). Directories are skipped."""
    names = sorted(p for p in root.iterdir() if any(fnmatch.fnmatchcase(p.name, pat) for pat in COPY_PATTERNS))
    return [checked_file(root, p) for p in names if p.is_symlink() or not p.is_dir()]
