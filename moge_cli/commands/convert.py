"""`moge convert`: layout, dtype, sharding, layer extraction, expert-parallel splits and their merge, streamed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import typer

from moge_cli.commands.common import handle_errors, human_bytes, print_json, sigterm_as_interrupt, stderr_console, stdout_console
from moge_cli.commands.options import (
    ALIAS_Q, DESTINATION, DRY_RUN, DTYPE, FORCE, JSON, MAX_SHARD_SIZE, QUIET, REVISION, SOURCE, VERBOSE, VERIFY_OUTPUT,
)  # fmt: skip
from moge_cli.commands.render import print_notes, render_plan

if TYPE_CHECKING:
    from moge_converters.convert import ConvertResult


@handle_errors
def convert_command(
    src: SOURCE,
    dst: DESTINATION,
    revision: REVISION = None,
    layout: Optional[str] = typer.Option(None, "--layout", help="per-expert | stacked (default: keep)."),
    dtype: DTYPE = None,
    clamp: bool = typer.Option(False, "--clamp", help="Casting to float16: clamp values beyond +-65504 (counted) instead of refusing."),
    max_shard_size: MAX_SHARD_SIZE = "5GB",
    layers: Optional[str] = typer.Option(None, "--layers", help="Keep these decoder layers, renumbered from 0: 0-1,5."),
    ep: Optional[int] = typer.Option(None, "--ep", min=1, help="Expert-parallel split into N rank directories of whole groups."),
    dry_run: DRY_RUN = False,
    force: FORCE = False,
    verify: VERIFY_OUTPUT = False,
    verbose: VERBOSE = False,
    quiet: QUIET = False,
    as_json: JSON = False,
    q: ALIAS_Q = False,
) -> None:
    """Convert a checkpoint in one streaming pass (layout, dtype, shards, layers, expert-parallel split).

    SRC may be the top directory of a --ep split: its rank directories are merged back into one checkpoint (bit-exact).

    Exit codes: 0 done, 1 --verify mismatch, 2 error or bad usage (nothing left behind), 130 Ctrl-C, 141 output pipe closed, 143 SIGTERM (cleaned up as on Ctrl-C).
    """
    from moge_converters.convert import convert

    quiet = quiet or q
    options: dict[str, Any] = dict(
        layout=layout, dtype=dtype, clamp=clamp, max_shard_size=max_shard_size, layers=layers, ep=ep, dry_run=dry_run, force=force,
        verify=verify, revision=revision,
    )  # fmt: skip
    with sigterm_as_interrupt():  # `kill` cleans up like Ctrl-C does
        if quiet or dry_run:
            result = convert(src, dst, **options)
        else:
            result = _with_progress(lambda progress: convert(src, dst, progress=progress, **options))
    print_notes(result, quiet)
    if as_json:
        print_json(result.to_dict())
    elif dry_run:
        render_plan(result, verbose)
    else:
        render_summary(result)


def _with_progress(run):
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr_console(), transient=True) as bar:
        task = bar.add_task("converting", total=None)
        return run(lambda n, total: bar.update(task, advance=n, total=total))


def render_summary(r: ConvertResult) -> None:
    out = stdout_console()
    rate = r.bytes_out / r.seconds if r.seconds else 0
    out.print(
        f"wrote {r.tensors} tensors in {len(r.outputs)} shard(s), {human_bytes(r.bytes_out)} "
        f"in {r.seconds:.1f} s ({human_bytes(rate)}/s), peak anonymous memory {human_bytes(r.peak_rss_bytes)} -> {r.destination}",
        highlight=False,
    )
    if r.clamped_values:
        worst = ", ".join(f"{n} ({c})" for n, c in list(r.clamped_tensors.items())[:5])
        out.print(f"clamped {r.clamped_values} value(s) to +-65504; worst: {worst}", highlight=False)
    if r.verified:
        out.print("[green]verified: every tensor matches its source[/green]")
