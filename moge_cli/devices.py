"""`--device`: checked against this machine and this torch build before any work starts."""

from __future__ import annotations

from moge_cli.errors import UsageError

SUPPORTED = "cpu, cuda, cuda:N or mps"


def check_device(name: str) -> str:
    """`name` when this torch can run on it; else UsageError in one line that says why (imports torch unless "cpu")."""
    if name == "cpu":
        return name
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device {name}: not a device; use {SUPPORTED}") from None
    if device.type == "cpu":
        return name
    if device.type == "cuda":
        return _check_cuda(name, device.index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {name}: Metal (MPS) is not available here; it needs Apple silicon and a macOS build of torch")
        return name
    raise UsageError(f"--device {name}: moge runs on {SUPPORTED}")


def _check_cuda(name: str, index: int | None) -> str:
    import torch

    if torch.version.cuda is None and torch.version.hip is None:
        raise UsageError(f"--device {name}: this torch ({torch.__version__}) is built without CUDA; install a CUDA build of torch or use --device cpu")
    count = torch.cuda.device_count()
    if count == 0:
        raise UsageError(f"--device {name}: no CUDA device is visible (driver missing, or CUDA_VISIBLE_DEVICES hides them all)")
    if index is not None and index >= count:
        raise UsageError(f"--device {name}: there are {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return name
