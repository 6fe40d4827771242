"""PyTorch `pytorch_model*.bin` / `.pt` state dicts as a conversion source, loaded with weights_only=True only.

Found by sources.torch_files (no torch); this module, which needs torch to read them, is imported only then.

weights_only=True means torch's restricted unpickler: tensors, plain containers and numbers, never
an arbitrary class or function, so no pickled code runs; a file that needs more is refused.
Files in the zip format (torch.save's default since 1.6) load with mmap=True: tensor data stays in
the file and is paged in as it is copied, like a safetensors shard. A legacy (pre-zip) file cannot
be memory-mapped and is read into memory whole, one file at a time; the converter says so.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from moge_cli.errors import CheckpointError, ConfigError
from moge_cli.files import optional_file, read_json
from moge_cli.safetensors_format import FROM_TORCH_NAME, TensorInfo


def load_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """A flat {name: tensor} from one file with weights_only=True; (state dict, memory-mapped?)."""
    mapped = zipfile.is_zipfile(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: refused: this file needs more than tensors to unpickle (weights_only=True failed: {first[:200]}). "
            "moge never runs pickled code; re-save it as a plain state dict (torch.save(model.state_dict(), ...)) where you trust it"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict (a mapping of tensor names to tensors)")
    bad = [(k, type(v).__name__) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        k, kind = bad[0]
        raise CheckpointError(f"{path}: entry {k!r} is a {kind}, not a tensor; expected a flat state dict of tensors ({len(bad)} such entries)")
    return sd, mapped


class TorchSource:
    """The converter's view of a PyTorch checkpoint: config, tensor dtypes/shapes, lazy flat tensors."""

    direct = False  # no byte ranges in a file to sendfile from

    def __init__(self, root: Path, files: list[Path], index: tuple[Path, dict[str, str]] | None = None, source: Path | None = None):
        """index: (pytorch_model.bin.index.json, its weight_map), checked against the files."""
        self.root, self.files, self.source = root, files, source or root
        cfg_path = optional_file(root, "config.json") or root / "config.json"
        if not cfg_path.is_file():
            raise ConfigError(f"{cfg_path}: config.json not found; a checkpoint needs its config.json beside the weights")
        self.config_dict: dict[str, Any] = read_json(cfg_path, error=ConfigError)
        self._tensors: dict[str, torch.Tensor] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.notes: list[str] = []
        for f in files:
            sd, mapped = load_state_dict(f)
            if not mapped:
                self.notes.append(f"{f.name}: legacy (non-zip) torch.save format, read into memory whole; re-save it to stream")
            for name, t in sd.items():
                if name in self._tensors:
                    raise CheckpointError(f"{root}: tensor {name!r} is stored in two files")
                code = FROM_TORCH_NAME.get(str(t.dtype).removeprefix("torch."))
                if code is None:
                    raise CheckpointError(f"{f}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold")
                self._tensors[name] = t
                nbytes = math.prod(t.shape) * t.element_size()
                self.tensors[name] = TensorInfo(name, code, tuple(t.shape), f, 0, nbytes)
        index_file, weight_map = index or (None, {})
        for name, fname in weight_map.items():
            if name not in self.tensors or self.tensors[name].file.name != Path(fname).name:
                raise CheckpointError(f"{index_file}: tensor {name!r} is indexed in {fname} but that file does not hold it")

    def flat(self, name: str) -> torch.Tensor:
        """The tensor as 1-D, still backed by the mapped file when it is contiguous (a copy otherwise)."""
        t = self._tensors[name]
        return (t if t.is_contiguous() else t.contiguous()).reshape(-1)

    def raw(self, name: str) -> memoryview:
        flat = self.flat(name)
        if flat.numel() == 0:
            return memoryview(b"")
        return memoryview(flat.view(torch.uint8).numpy()).cast("B")

    def file_range(self, name: str) -> None:
        return None

    def close(self) -> None:
        self._tensors.clear()
