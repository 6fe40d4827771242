"""Checkpoint conversion: layout, dtype, sharding, layer extraction and expert-parallel splits, streamed.

`convert(src, dst, **options)` is the whole pipeline; `build_plan` (per-tensor recipes),
`plan_shards` / `write_shards` (streaming safetensors writer) and `staging_dir` are the pieces
other commands (quantize) reuse.
"""

from converters.convert import convert
from converters.plan import OutTensor, Part, Plan, build_plan, parse_layers
from converters.shards import parse_size, plan_shards, staging_dir, write_shards

__all__ = ["convert", "build_plan", "parse_layers", "parse_size", "plan_shards", "write_shards", "staging_dir", "OutTensor", "Part", "Plan"]
