"""`Problem`: one row of the `problems` list in `moge load`'s report (schema, shard scan, manifest, expert-parallel plan)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a readable checkpoint.

    kind: missing, unexpected, shape, dtype, layout, index, config, nonfinite, zero, hash, ep.
    """

    kind: str
    tensor: str
    detail: str
