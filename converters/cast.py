"""dtype casts in bounded chunks, with float16 overflow accounting (count, refuse or clamp).

The cast is torch's round-to-nearest-even `.to(dtype)`. A value overflows float16 when it is
finite and its magnitude exceeds 65504 (the largest float16). Without clamp such values would
become +-inf; with clamp they become +-65504. NaN and +-inf in the source are not overflows
and pass through unchanged either way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from moge_cli.errors import UsageError
from moge_cli.safetensors_format import TORCH_NAMES

FP16_MAX = 65504.0
CHUNK_ELEMS = 1 << 21  # elements cast at a time: 2M (4 MB of bf16 in, 4 MB of fp16 out), cache-sized


def torch_dtype(code: str) -> torch.dtype:
    return getattr(torch, TORCH_NAMES[code])


def cast_chunk(x: torch.Tensor, dtype: torch.dtype, clamp: bool, out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """x cast to dtype (written into `out[:n]` when given) and the number of float16 overflows.

    With clamp, overflowing values become +-65504 instead of +-inf. A cheap min/max screen skips
    the exact count for the usual chunk that holds nothing beyond float16's range.
    """
    y = out[: x.numel()] if out is not None else torch.empty(x.shape, dtype=dtype)
    y.copy_(x)
    if dtype != torch.float16 or x.dtype == torch.float16 or x.numel() == 0 or not x.is_floating_point():
        return y, 0
    lo, hi = torch.aminmax(x)
    lo, hi = float(lo), float(hi)
    if -FP16_MAX <= lo and hi <= FP16_MAX:  # false for NaN too: then count exactly
        return y, 0
    xf = _wide(x)
    finite = torch.isfinite(xf)
    n = int(((xf.abs() > FP16_MAX) & finite).sum())
    if n and clamp:
        y.copy_(torch.where(finite, xf.clamp(-FP16_MAX, FP16_MAX), xf))
    return y, n


def cast_exact(x: torch.Tensor, dtype: torch.dtype, clamp: bool) -> torch.Tensor:
    """The reference cast --verify compares against: the same rule, written the obvious way."""
    if clamp and dtype == torch.float16 and x.is_floating_point():
        xf = _wide(x)
        return torch.where(torch.isfinite(xf), xf.clamp(-FP16_MAX, FP16_MAX), xf).to(dtype)
    return x.to(dtype)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in a dtype that holds 65504 exactly and every value of x (bf16 -> fp32; fp32/fp64 as they are)."""
    return x if x.element_size() >= 4 else x.float()


@dataclass
class CastStats:
    """Overflow counts per output tensor, and how many values were cast."""

    overflow: Counter = field(default_factory=Counter)
    values_cast: int = 0

    def add(self, name: str, n_values: int, n_overflow: int) -> None:
        self.values_cast += n_values
        if n_overflow:
            self.overflow[name] += n_overflow

    @property
    def total_overflow(self) -> int:
        return sum(self.overflow.values())

    def worst(self, k: int = 5) -> list[tuple[str, int]]:
        return self.overflow.most_common(k)

    def report(self, k: int = 5) -> str:
        worst = ", ".join(f"{name} ({n})" for name, n in self.worst(k))
        more = len(self.overflow) - min(k, len(self.overflow))
        return f"{self.total_overflow} value(s) in {len(self.overflow)} tensor(s) exceed float16's +-65504; worst: {worst}" + (
            f" and {more} more" if more else ""
        )


class Fp16OverflowError(UsageError):
    """Casting to float16 would turn finite values into inf; raised unless clamp=True."""

    def __init__(self, stats: CastStats):
        self.stats = stats
        super().__init__(f"{stats.report()}. Refusing to write inf; pass --clamp to clamp them to +-65504 (counts are reported), or keep bfloat16")
