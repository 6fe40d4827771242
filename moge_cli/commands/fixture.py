"""`moge fixture`: write a deterministic random checkpoint (or a sparse full-size skeleton) of any MoGE config.

Test and benchmark checkpoints, in the released Hugging Face layout, without downloading anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moge_cli.commands.common import handle_errors
from moge_cli.commands.options import DTYPE_CHOICES, canonical_dtype


@handle_errors
def fixture_command(
    config: str = typer.Argument(..., help="A preset (tiny-moge, tiny-trained, bench-0.47b, pangu-pro-moe-72b, ...) or a config.json path."),
    out_dir: Path = typer.Argument(..., help="Destination directory."),
    seed: int = typer.Option(0, "--seed", help="Random seed; each tensor is seeded by seed + crc32(its name)."),
    dtype: str = typer.Option("bfloat16", "--dtype", callback=canonical_dtype, help=f"{DTYPE_CHOICES}."),
    layout: str = typer.Option("per-expert", "--layout", help="per-expert (as released) | stacked."),
    max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="Largest shard (tensor bytes): 5GB, 500MB, 2GiB... (default: one model.safetensors; 5GB with --skeleton)."),
    skeleton: bool = typer.Option(False, "--skeleton", help="Real headers and index over sparse all-zero data (the 72B layout in ~0 bytes of disk); no tokenizer."),
    no_tokenizer: bool = typer.Option(False, "--no-tokenizer", help="Write no tokenizer files."),
) -> None:
    """Write a synthetic checkpoint with the names, shapes and file layout of Pangu Pro MoE; prints its path.

    Exit codes: 0 written, 2 error or bad usage, 130 Ctrl-C, 141 output pipe closed.
    """
    from moge_cli.config import MoGEConfig
    from moge_cli.synthetic import SKELETON_SHARD_BYTES, write_checkpoint, write_skeleton

    from moge_converters.shards import parse_size

    cfg = MoGEConfig.from_file(config) if Path(config).is_file() else MoGEConfig.from_name(config)
    shard = None if max_shard_size is None else parse_size(max_shard_size)
    if skeleton:
        out = write_skeleton(cfg, out_dir, dtype=dtype, layout=layout, max_shard_bytes=shard or SKELETON_SHARD_BYTES)
    else:
        out = write_checkpoint(cfg, out_dir, seed=seed, dtype=dtype, layout=layout, max_shard_bytes=shard, tokenizer=not no_tokenizer)
    print(out)
