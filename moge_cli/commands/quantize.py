"""`moge quantize`: weight-only int8 / int4 quantization into the compressed-tensors format, streamed."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import typer

from moge_cli.commands.common import handle_errors, human_bytes, print_json, sigterm_as_interrupt, stderr_console, stdout_console
from moge_cli.commands.options import (
    ALIAS_EVAL, ALIAS_EVAL_WINDOW, ALIAS_Q, DESTINATION, DEVICE, DRY_RUN, FORCE, JSON, MAX_SHARD_SIZE, PERPLEXITY, QUIET, REVISION,
    SOURCE, THREADS, VERBOSE, VERIFY_OUTPUT, apply_threads, either,
)  # fmt: skip
from moge_cli.commands.render import print_notes, render_plan

if TYPE_CHECKING:
    from moge_converters.quantize_pipeline import QuantizeResult


@handle_errors
def quantize_command(
    src: SOURCE,
    dst: DESTINATION,
    revision: REVISION = None,
    bits: int = typer.Option(4, "--bits", help="8: symmetric, one scale per output channel; 4: groups of --group-size."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="4-bit group size: 32, 64 or 128 (default 128)."),
    symmetric: Optional[bool] = typer.Option(None, "--symmetric/--asymmetric", help="4-bit zero points (default asymmetric)."),
    method: str = typer.Option("rtn", "--method", help="rtn (round to nearest) | mse (search each group's scale and zero point for the least error)."),
    embeddings: bool = typer.Option(False, "--embeddings", help="Also quantize model.embed_tokens."),
    lm_head: bool = typer.Option(False, "--lm-head", help="Also quantize lm_head."),
    include: Optional[List[str]] = typer.Option(None, "--include", help="Only quantize tensors matching this glob (repeatable)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Never quantize tensors matching this glob (repeatable)."),
    max_shard_size: MAX_SHARD_SIZE = "5GB",
    perplexity: PERPLEXITY = None,
    perplexity_window: Optional[int] = typer.Option(None, "--perplexity-window", help="Perplexity window in tokens (default 512)."),
    calib: Optional[Path] = typer.Option(None, "--calib", metavar="FILE", help="Text run through the model to weight each column's error by its activations (with --method mse)."),
    calib_tokens: int = typer.Option(2048, "--calib-tokens", help="Tokens of the --calib text to use."),
    device: DEVICE = "cpu",
    threads: THREADS = None,
    dry_run: DRY_RUN = False,
    force: FORCE = False,
    verify: VERIFY_OUTPUT = False,
    verbose: VERBOSE = False,
    errors: bool = typer.Option(False, "--errors", hidden=True),  # now --verbose
    quiet: QUIET = False,
    as_json: JSON = False,
    q: ALIAS_Q = False,
    eval_text: ALIAS_EVAL = None,
    eval_window: ALIAS_EVAL_WINDOW = None,
) -> None:
    """Quantize a checkpoint's weights to int8 or int4 (vLLM-loadable compressed-tensors), streamed.

    --perplexity FILE measures the source and the output on that text (before / after). --verbose lists every tensor's error (always in --json).
    --device runs the model of --calib and --perplexity there (the rounding runs on the CPU).

    Exit codes: 0 done, 1 --verify mismatch, 2 error or bad usage (nothing left behind), 130 Ctrl-C, 141 output pipe closed, 143 SIGTERM (cleaned up as on Ctrl-C).
    """
    from moge_cli.devices import check_device
    from moge_cli.ep import refuse_rank_directory
    from moge_converters.quantize_pipeline import quantize_checkpoint

    refuse_rank_directory(src)  # one rank of `convert --ep`: say what it is
    check_device(device)  # before anything loads or is written
    quiet, verbose = quiet or q, verbose or errors
    apply_threads(threads)
    options: dict[str, Any] = dict(
        bits=bits, group_size=group_size, symmetric=symmetric, method=method, embeddings=embeddings, lm_head=lm_head,
        include=tuple(include or ()), exclude=tuple(exclude or ()), max_shard_size=max_shard_size, dry_run=dry_run,
        force=force, verify=verify, eval_text=either(perplexity, eval_text, None),
        eval_window=either(perplexity_window, eval_window, None), calib=calib, calib_tokens=calib_tokens, revision=revision,
        device=device,
    )  # fmt: skip
    with sigterm_as_interrupt():  # `kill` cleans up like Ctrl-C does
        if quiet or dry_run:
            result = quantize_checkpoint(src, dst, **options)
        else:
            result = _with_progress(
                lambda written, layers, scored: quantize_checkpoint(src, dst, progress=written, calib_progress=layers, eval_progress=scored, **options)
            )
    print_notes(result, quiet)
    if as_json:
        print_json(result.to_dict())
    elif dry_run:
        qs = result.quantization
        stdout_console().print(
            f"quantize {result.quantized_tensors} tensors: int{qs.bits} "
            + ("per channel" if qs.group_size is None else f"g{qs.group_size}")
            + (" sym" if qs.symmetric else " asym") + f", {qs.method}; by component: "
            + ", ".join(f"{c} {n}" for c, n in qs.components.items()),
            highlight=False,
        )
        render_plan(result, verbose)
    else:
        render(result, verbose)


def _with_progress(run):
    """run(written, layers, scored) with progress bars on stderr: layers calibrated (--calib), bytes written,
    tokens scored for --perplexity (the source, then the output)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = ("[progress.description]{task.description}", BarColumn(), TextColumn("{task.fields[done]}"), TimeRemainingColumn())
    tasks: dict[str, Any] = {}
    with Progress(*columns, console=stderr_console(), transient=True) as bar:

        def show(key: str, label: str, done: int, total: int, text: str) -> None:
            if key not in tasks:
                tasks[key] = bar.add_task(label, total=total, done="")
            bar.update(tasks[key], completed=done, total=total, done=text)

        def counter(key: str, label: str, text):
            done = [0]

            def step(n: int, total: int) -> None:  # n more of total
                done[0] += n
                show(key, label, done[0], total, text(done[0], total))

            return step

        written = counter("write", "quantizing", lambda d, t: f"{human_bytes(d)} / {human_bytes(t)}")
        layers = counter("calib", "calibrating", lambda d, t: f"layer {int(d)} / {t}")

        def scored(done: int, total: int) -> None:  # done of total, so far
            show("eval", "perplexity", done, total, f"{done} / {total} tokens")

        return run(written, layers, scored)


def render(r: QuantizeResult, per_tensor: bool = False) -> None:
    from rich.table import Table

    out = stdout_console()
    q = r.quantization
    what = f"int{q.bits} " + ("per channel" if q.bits == 8 else f"g{q.group_size}") + (" sym" if q.symmetric else " asym")
    out.print(
        f"quantized {r.quantized_tensors} of {r.tensors} tensors ({what}, {q.method}): {human_bytes(r.bytes_in)} -> "
        f"{human_bytes(r.bytes_out)} ({r.bytes_in / max(r.bytes_out, 1):.2f}x smaller) in {r.seconds:.1f} s, "
        f"peak anonymous memory {human_bytes(r.peak_rss_bytes)} -> {r.destination}",
        highlight=False,
    )
    if c := q.calibration:
        out.print(
            f"calibrated on {c['tokens']} tokens of {c['file']}: {c['modules']} weights weighted by their activations; "
            f"{c['experts'] - c['experts_reached']} of {c['experts']} routed experts reached by no token (plain mse)",
            highlight=False,
        )
    t = Table(title="reconstruction error by component", title_justify="left")
    for col in ("component", "tensors", "rel. Frobenius error", "SQNR dB (pooled)", "SQNR dB mean", "SQNR dB worst"):
        t.add_column(col, justify="left" if col == "component" else "right")
    for name, c in r.quality.components.items():
        t.add_row(name, str(c["tensors"]), f"{c['rel_error']:.4f}", f"{c['sqnr_db']:.2f}", f"{c['mean_sqnr_db']:.2f}", f"{c['min_sqnr_db']:.2f}")
    o = r.quality.overall
    t.add_row("all", str(r.quantized_tensors), f"{o['rel_error']:.4f}", f"{o['sqnr_db']:.2f}", "", "")
    out.print(t)
    if per_tensor:
        t = Table(title="per tensor", title_justify="left")
        for col in ("tensor", "scheme", "rel. error", "SQNR dB"):
            t.add_column(col, justify="left" if col in ("tensor", "scheme") else "right")
        for row in r.quality.tensors:
            t.add_row(row["tensor"], row["scheme"], f"{row['rel_error']:.4f}", f"{row['sqnr_db']:.2f}")
        out.print(t)
    if (e := r.eval) is not None:
        out.print(
            f"perplexity on {e.text} ({e.tokens} tokens, window {e.window}): {e.before:.4f} -> {e.after:.4f} ({100 * e.change:+.2f}%)",
            highlight=False,
        )
    if r.verified:
        out.print("[green]verified: every tensor matches its source or a fresh quantization[/green]")
