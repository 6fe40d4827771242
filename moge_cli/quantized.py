"""Quantized (compressed-tensors pack-quantized) checkpoints at run time: reading the stored modules and
building their compute objects (moge_kernels.qlinear.QLinear; the kernels and modes are described there).

moge_cli.loader.load_quantized builds the usual model and puts a QLinear wherever a quantized weight
was: attention, lm_head, the routed experts ([E, N, K] stacks, one expert picked per call), the shared
expert and dense MLPs. The model's modules call moge_kernels.ops, which runs either kind of weight.
Embeddings, and any weight whose parts mix schemes, are dequantised once at load.
bench/bench_quantize.py measures the kernels.
"""

from __future__ import annotations

import json
import os

import torch

from moge_kernels.qlinear import KERNELS, QLinear, dequantize
from moge_cli import hugepages
from moge_cli.errors import CheckpointError, UsageError
from moge_cli.files import optional_file
from moge_cli.quant_format import QuantizedCheckpoint, Scheme, read_quantization, unpack_int32

DEFAULT_KERNEL = os.environ.get("MOGE_QUANT_KERNEL", "native")
LINEAR_PARAMS = ("qkv_weight", "o_weight", "lm_head", "gate_up", "down", "shared_w13", "shared_w2", "w13", "w2")
__all__ = ["KERNELS", "DEFAULT_KERNEL", "LINEAR_PARAMS", "QLinear", "dequantize", "qlinear", "read_module", "quantization_of"]


# ---- the stored integers -------------------------------------------------------------------------
def unpack_rows(packed: torch.Tensor, bits: int, n: int, k: int, dim: int = 1) -> torch.Tensor:
    """compressed-tensors int32 words -> signed int8 [n, k] (dim=0: packed along rows, as zero points are)."""
    return unpack_int32(packed, bits, (n, k), dim)


def read_module(ckpt, module: str, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q int8 [N, K], scale [N, G], zero int8 [N, G] or None) of a stored module."""
    n, k = (int(v) for v in ckpt.tensor(f"{module}.weight_shape").tolist())
    q = unpack_rows(ckpt.tensor(f"{module}.weight_packed"), scheme.bits, n, k)
    scale = ckpt.tensor(f"{module}.weight_scale").clone()
    if scale.shape[0] != n or k % scale.shape[1]:
        raise CheckpointError(f"{module}.weight_scale: shape {list(scale.shape)} does not fit weight_shape {[n, k]}")
    zero = None
    if not scheme.symmetric:
        zero = unpack_rows(ckpt.tensor(f"{module}.weight_zero_point"), scheme.bits, n, scale.shape[1], dim=0)
    return q, scale, zero


def qlinear(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], scheme: Scheme, dtype: torch.dtype, kernel: str) -> QLinear:
    """The QLinear of a weight (or a stack of experts) from its parts (q, scale, zero) per expert, its
    stacks in 2 MB pages where they can be (moge_cli.hugepages: the decode kernels stream them)."""
    if kernel not in KERNELS:
        raise UsageError(f"quantized kernel {kernel!r}: use one of {', '.join(KERNELS)}")
    return QLinear(parts, scheme.bits, scheme.symmetric, dtype, kernel, empty=hugepages.empty)


# ---- which checkpoints are quantized ------------------------------------------------------------
def quantization_of(ckpt) -> QuantizedCheckpoint | None:
    """The checkpoint's quantization (read from config.json and the tensor names), or None."""
    path = optional_file(ckpt.root, "config.json")  # checked by moge_cli.files when the checkpoint opened; again, as read
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path is not None else dict(ckpt.config.extra)
    except (OSError, ValueError):
        config = dict(ckpt.config.extra)
    return read_quantization(config, {n: i.shape for n, i in ckpt.tensors.items()})
