"""float16 overflow accounting, without torch: counts per output tensor (CastStats) and the refusal (Fp16OverflowError).

A value overflows float16 when it is finite and its magnitude exceeds 65504 (the largest float16);
converters/cast.py counts them as it casts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from moge_cli.errors import UsageError

FP16_MAX = 65504.0


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
