"""Conversion sources: a safetensors checkpoint (through the reader) or a PyTorch state dict, one interface.

Both give `config_dict`, `tensors` (name -> TensorInfo, in file order), `flat(name)` (a 1-D tensor
backed by the file), `raw(name)` (its bytes) and `file_range(name)` ((path, offset) of the bytes in a
file, for sendfile; None for PyTorch files), plus `root` and `close()`. A third, SplitSource, reads the rank directories of a `convert --ep`
split as the one checkpoint they came from (the merge).
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any

from moge_cli.checkpoint import Checkpoint, open_checkpoint, resolve_location
from moge_cli.config import MoGEConfig
from moge_cli.ep import ep_info, is_ep_dir, plan_problems, read_ep_plan
from moge_cli.errors import CheckpointError, ConfigError
from moge_cli.files import checked_file, checked_named_file, present, read_json
from moge_cli.names import EXPERT_EXTRA_RE, LAYOUTS, STACKED_RE, expert_name, with_expert
from moge_cli.safetensors_format import DTYPE_SIZES, TORCH_SUFFIXES, TensorInfo

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


class SplitSource:
    """The rank directories of a `convert --ep` split (moge_cli.ep), read as the whole checkpoint they came from.

    config_dict is the ranks' config.json without `moge_ep`; replicated tensors come from rank 0 (every
    rank must hold the same names, dtypes and shapes); each rank's expert tensors appear under their
    global ids, a stacked [El, 2I, H] / [El, H, I] tensor as El per-expert views of its file bytes (no
    copy), so build_plan stacks or keeps them like any per-expert source. `layout` is the ranks' layout,
    the output's default.
    """

    direct = True
    notes: list[str] = []

    def __init__(self, root: Path):
        plan = read_ep_plan(root)
        self.root = self.source = root
        self.ranks: list[SafetensorsSource] = []
        try:
            for entry in plan["ranks"]:
                self.ranks.append(SafetensorsSource(open_checkpoint(root / entry["path"])))
            self.config_dict, rank_experts = self._merged_config(plan)
            self.files_root = self.ranks[0].root  # tokenizer and friends, as every rank has them
            layouts = {r.ckpt.layout for r in self.ranks}
            self.layout = layouts.pop() if len(layouts) == 1 and layouts <= set(LAYOUTS) else None
            self.tensors: dict[str, TensorInfo] = {}
            self._views: dict[str, tuple[SafetensorsSource, str]] = {}  # name -> (rank, the rank's tensor it lies in)
            for rank, experts in zip(self.ranks, rank_experts):
                self._add_rank(rank, experts)
        except BaseException:
            self.close()
            raise

    def _merged_config(self, plan: dict[str, Any]) -> tuple[dict[str, Any], list[list[int]]]:
        """The config without moge_ep (every rank's must agree), and each rank's global expert ids."""
        configs = [{k: v for k, v in r.config_dict.items() if k != "moge_ep"} for r in self.ranks]
        for entry, conf in zip(plan["ranks"], configs):
            if conf != configs[0]:
                raise CheckpointError(f"{self.root / entry['path']}: config.json differs from rank 0's (besides moge_ep); not one split")
        eps = [ep_info(MoGEConfig.from_dict(r.config_dict)) for r in self.ranks]
        bad = plan_problems(plan, eps)
        if bad:
            raise CheckpointError(f"{self.root}: the rank directories do not match ep_plan.json: " + "; ".join(f"{t}: {d}" for t, d in bad[:3]))
        return configs[0], [ep["experts"] for ep in eps]

    def _add_rank(self, rank: SafetensorsSource, experts: list[int]) -> None:
        replicated = {n: (t.dtype, t.shape) for n, t in self.ranks[0].tensors.items() if not EXPERT_EXTRA_RE.match(n) and not STACKED_RE.match(n)}
        mine = {n: (t.dtype, t.shape) for n, t in rank.tensors.items() if not EXPERT_EXTRA_RE.match(n) and not STACKED_RE.match(n)}
        if mine != replicated:
            odd = sorted(set(mine.items()) ^ set(replicated.items()))[0][0]
            raise CheckpointError(f"{rank.root}: its replicated tensors differ from rank 0's (e.g. {odd}); not one split")
        for name, info in rank.tensors.items():
            if m := STACKED_RE.match(name):
                for view in _expert_views(info, int(m.group(1)), m.group(2), experts):
                    self._add(view, rank, name)
            elif EXPERT_EXTRA_RE.match(name):
                self._add(info._replace(name=with_expert(name, experts[int(EXPERT_EXTRA_RE.match(name).group(2))])), rank, name)
            elif rank is self.ranks[0]:
                self._add(info, rank, name)

    def _add(self, info: TensorInfo, rank: SafetensorsSource, name: str) -> None:
        if info.name in self.tensors:
            raise CheckpointError(f"{rank.root}: {info.name} is held twice across the ranks; not one split")
        self.tensors[info.name] = info
        self._views[info.name] = (rank, name)

    def _offset(self, name: str) -> tuple[SafetensorsSource, str, int]:
        """(rank, its tensor, byte offset of `name` in it)."""
        rank, inner = self._views[name]
        return rank, inner, self.tensors[name].start - rank.tensors[inner].start

    def flat(self, name: str):
        rank, inner, off = self._offset(name)
        first = off // DTYPE_SIZES[self.tensors[name].dtype]
        return rank.flat(inner)[first : first + self.tensors[name].numel]

    def raw(self, name: str) -> memoryview:
        rank, inner, off = self._offset(name)
        return rank.raw(inner)[off : off + self.tensors[name].nbytes]

    def file_range(self, name: str) -> tuple[Path, int]:
        info = self.tensors[name]
        return info.file, info.start

    def close(self) -> None:
        for r in self.ranks:
            r.close()


def _expert_views(info: TensorInfo, layer: int, which: str, experts: list[int]) -> list[TensorInfo]:
    """A rank's stacked tensor [El, 2I, H] (gate rows, then up rows) or [El, H, I] as per-expert TensorInfos
    of global ids, each a byte range of the same file."""
    block = info.nbytes // len(experts)
    out = []
    for local, e in enumerate(experts):
        start = info.start + local * block
        if which == "gate_up_proj":
            half, rows = block // 2, info.shape[1] // 2
            out.append(TensorInfo(expert_name(layer, e, "gate_proj"), info.dtype, (rows, *info.shape[2:]), info.file, start, start + half))
            out.append(TensorInfo(expert_name(layer, e, "up_proj"), info.dtype, (rows, *info.shape[2:]), info.file, start + half, start + block))
        else:
            out.append(TensorInfo(expert_name(layer, e, "down_proj"), info.dtype, tuple(info.shape[1:]), info.file, start, start + block))
    return out


def open_source(path: str | os.PathLike, *, revision: str | None = None):
    """A safetensors or PyTorch checkpoint at `path` (directory, file, or cached Hugging Face repo id at
    `revision`), validated; the top directory of a `convert --ep` split is read as one checkpoint (SplitSource)."""
    p = resolve_location(path, revision)
    if is_ep_dir(p):
        return SplitSource(p)
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
