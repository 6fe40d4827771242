"""Options that several commands share, defined once: one name and one help text each.

Names follow llama.cpp, mlx-lm and the hf CLI where those agree: -n/--max-new-tokens, --temp,
-t/--threads, -p/--prompt, -f/--file, --revision, --dtype bf16. Spellings that older scripts use
stay as hidden aliases (ALIAS_*), merged into the new option by `either`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer

from moge_cli.dtypes import CHOICES as DTYPE_CHOICES
from moge_cli.dtypes import SPELLINGS as DTYPE_NAMES  # what people type -> the torch name the library takes
from moge_cli.errors import UsageError

T = TypeVar("T")


def canonical_dtype(name: Optional[str]) -> Optional[str]:
    """`bf16`, `FP16`, `torch.float32`... -> bfloat16 | float16 | float32; None stays None."""
    if name is None:
        return None
    key = name.strip().lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise typer.BadParameter(f"{name!r} is not a dtype moge runs; use {DTYPE_CHOICES}")
    return DTYPE_NAMES[key]


def either(new: T, old: Optional[T], default: T) -> T:
    """The value of an option given under its new name or its hidden old one (the new name wins)."""
    return old if new == default and old is not None else new


# -- what the checkpoint is
REVISION = Annotated[Optional[str], typer.Option("--revision", help="Branch, tag or commit of a Hugging Face repo id (read from the local cache).")]
DTYPE = Annotated[Optional[str], typer.Option("--dtype", callback=canonical_dtype, help=f"{DTYPE_CHOICES}; default: the checkpoint's.")]
DEVICE = Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N | mps; checked before anything loads.")]
THREADS = Annotated[Optional[int], typer.Option("--threads", "-t", min=1, help="CPU threads (default: torch's, one per core).")]
EP = Annotated[Optional[int], typer.Option("--ep", metavar="N", min=1, help="Expert parallel: N ranks on this machine (torch.distributed: gloo on cpu, NCCL on cuda), each holding G/N groups of experts; N must divide the groups. Under torchrun --nproc-per-node N each process is one rank (--ep defaults to its WORLD_SIZE).")]

# -- what goes in
PROMPT = Annotated[Optional[str], typer.Option("--prompt", "-p", help="Prompt text.")]
PROMPT_FILE = Annotated[Optional[Path], typer.Option("--file", "-f", metavar="FILE", help="Read the prompt from this text file.")]
PROMPT_IDS = Annotated[Optional[str], typer.Option("--prompt-ids", metavar="ID,ID,...", help="Token ids, bypassing the tokenizer (works without one).")]
MAX_NEW_TOKENS = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate.")]
PERPLEXITY = Annotated[Optional[Path], typer.Option("--perplexity", metavar="FILE", help="Also measure perplexity on this text file.")]

# -- writing a checkpoint (convert, quantize)
SOURCE = Annotated[str, typer.Argument(help="Source: checkpoint directory, .safetensors file, pytorch_model*.bin / .pt, or cached repo id.")]
DESTINATION = Annotated[Path, typer.Argument(help="Destination directory (must not exist unless --force; not inside the source).")]
MAX_SHARD_SIZE = Annotated[str, typer.Option("--max-shard-size", help="Largest shard (tensor bytes): 5GB, 500MB, 2GiB...")]
DRY_RUN = Annotated[bool, typer.Option("--dry-run", help="Print the plan (shards, memory, disk; every tensor with --verbose); write nothing.")]
FORCE = Annotated[bool, typer.Option("--force", help="Replace an existing destination.")]
VERIFY_OUTPUT = Annotated[bool, typer.Option("--verify", help="Re-read the output and compare every tensor with what it should hold; exit 1 on a mismatch.")]
VERBOSE = Annotated[bool, typer.Option("--verbose", "-v", help="List every tensor (the --dry-run plan, the per-tensor errors).")]

# -- what comes out
JSON = Annotated[bool, typer.Option("--json", help='Print the result as JSON on stdout; a failure prints {"error", "kind", "exit_code"} there.')]
QUIET = Annotated[bool, typer.Option("--quiet", help="Nothing on stderr but errors: no progress, notes or statistics.")]

# -- old spellings, kept for scripts; not in --help
ALIAS_Q = Annotated[bool, typer.Option("-q", hidden=True)]  # was --quiet's short name (mlx-lm's -q means quantize)
ALIAS_TEXT_FILE = Annotated[Optional[Path], typer.Option("--text-file", hidden=True)]  # profile: now -f/--file
ALIAS_DECODE = Annotated[Optional[int], typer.Option("--decode", hidden=True)]  # profile: now -n/--max-new-tokens
ALIAS_EVAL = Annotated[Optional[Path], typer.Option("--eval", hidden=True)]  # quantize: now --perplexity
ALIAS_EVAL_WINDOW = Annotated[Optional[int], typer.Option("--eval-window", hidden=True)]  # quantize: now --perplexity-window


def apply_threads(threads: Optional[int]) -> None:
    """-t/--threads: torch's thread count, which the C decode kernels use too."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def parse_ids(text: str) -> list[int]:
    """--prompt-ids: `1,2,3` (spaces allowed) -> [1, 2, 3]."""
    parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"--prompt-ids: {text!r} is not a comma-separated list of integer token ids") from None
    if not ids:
        raise UsageError("--prompt-ids: no token ids given")
    if any(i < 0 for i in ids):
        raise UsageError("--prompt-ids: token ids cannot be negative")
    return ids
