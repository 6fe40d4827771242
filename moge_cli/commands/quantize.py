"""`moge quantize`: weight-only int8 / int4 quantization into the compressed-tensors format, streamed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

from moge_cli.commands.common import handle_errors, human_bytes, print_json, stderr_console, stdout_console
from moge_cli.commands.convert import render_plan


@handle_errors
def quantize_command(
    src: str = typer.Argument(..., help="Source: float checkpoint directory, .safetensors file, pytorch_model*.bin / .pt, or cached repo id."),
    dst: Path = typer.Argument(..., help="Destination directory (must not exist unless --force; not inside the source)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Revision of a Hugging Face repo id (cache only)."),
    bits: int = typer.Option(4, "--bits", help="8: symmetric, one scale per output channel; 4: groups of --group-size."),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="4-bit group size: 32, 64 or 128 (default 128)."),
    symmetric: Optional[bool] = typer.Option(None, "--symmetric/--asymmetric", help="4-bit zero points (default asymmetric)."),
    method: str = typer.Option("rtn", "--method", help="rtn (round to nearest) | mse (search each group's scale and zero point for the least error)."),
    embeddings: bool = typer.Option(False, "--embeddings", help="Also quantize model.embed_tokens."),
    lm_head: bool = typer.Option(False, "--lm-head", help="Also quantize lm_head."),
    include: Optional[List[str]] = typer.Option(None, "--include", help="Only quantize tensors matching this glob (repeatable)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Never quantize tensors matching this glob (repeatable)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest shard (tensor bytes): 5GB, 500MB, 2GiB..."),
    eval_text: Optional[Path] = typer.Option(None, "--eval", help="Perplexity before and after on this text file."),
    eval_window: Optional[int] = typer.Option(None, "--eval-window", help="Perplexity window in tokens (default 512)."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Text run through the model to weight each column's error by its activations (with --method mse)."),
    calib_tokens: int = typer.Option(2048, "--calib-tokens", help="Tokens of the --calib text to use."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (shards, tensors, memory, disk); write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace an existing destination."),
    verify: bool = typer.Option(False, "--verify", help="Re-read the output and compare it with a fresh quantization; exit 1 on a mismatch."),
    errors: bool = typer.Option(False, "--errors", help="List the error of every quantized tensor (always in --json)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (or the --dry-run plan) as JSON on stdout."),
) -> None:
    """Quantize a checkpoint's weights to int8 or int4 (vLLM-loadable compressed-tensors). Exit 0 done, 1 --verify mismatch, 2 error."""
    from moge_converters.quantize_pipeline import quantize_checkpoint

    options: dict[str, Any] = dict(
        bits=bits, group_size=group_size, symmetric=symmetric, method=method, embeddings=embeddings, lm_head=lm_head,
        include=tuple(include or ()), exclude=tuple(exclude or ()), max_shard_size=max_shard_size, dry_run=dry_run,
        force=force, verify=verify, eval_text=eval_text, eval_window=eval_window, calib=calib, calib_tokens=calib_tokens,
        revision=revision,
    )  # fmt: skip
    if quiet or dry_run:
        result = quantize_checkpoint(src, dst, **options)
    else:
        result = _with_progress(lambda progress, layers: quantize_checkpoint(src, dst, progress=progress, calib_progress=layers, **options))
    for note in result.get("notes", []):
        stderr_console().print(f"note: {note}", highlight=False)
    if as_json:
        print_json(result)
    elif dry_run:
        q = result["quantization"]
        stdout_console().print(
            f"quantize {result['quantized_tensors']} tensors: int{q['bits']} "
            + ("per channel" if q["group_size"] is None else f"g{q['group_size']}")
            + (" sym" if q["symmetric"] else " asym") + f", {q['method']}; by component: "
            + ", ".join(f"{c} {n}" for c, n in q["components"].items()),
            highlight=False,
        )
        render_plan(result)
    else:
        render(result, errors)


def _with_progress(run):
    """run(progress, layers) with progress bars on stderr: layers calibrated (--calib), then bytes written."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = ("[progress.description]{task.description}", BarColumn(), TextColumn("{task.fields[done]}"), TimeRemainingColumn())
    tasks: dict[str, Any] = {}
    done: dict[str, int] = {}
    with Progress(*columns, console=stderr_console(), transient=True) as bar:

        def step(key: str, label: str, n: int, total: int, text) -> None:
            if key not in tasks:
                tasks[key] = bar.add_task(label, total=total, done="")
            done[key] = done.get(key, 0) + n
            bar.update(tasks[key], completed=done[key], total=total, done=text(done[key], total))

        def written(n: int, total: int) -> None:
            step("write", "quantizing", n, total, lambda d, t: f"{human_bytes(d)} / {human_bytes(t)}")

        def layers(n: int, total: int) -> None:
            step("calib", "calibrating", n, total, lambda d, t: f"layer {int(d)} / {t}")

        return run(written, layers)


def render(r: dict[str, Any], per_tensor: bool = False) -> None:
    from rich.table import Table

    out = stdout_console()
    q = r["quantization"]
    what = f"int{q['bits']} " + ("per channel" if q["bits"] == 8 else f"g{q['group_size']}") + (" sym" if q["symmetric"] else " asym")
    out.print(
        f"quantized {r['quantized_tensors']} of {r['tensors']} tensors ({what}, {q['method']}): {human_bytes(r['bytes_in'])} -> "
        f"{human_bytes(r['bytes_out'])} ({r['bytes_in'] / max(r['bytes_out'], 1):.2f}x smaller) in {r['seconds']:.1f} s, "
        f"peak anonymous memory {human_bytes(r['peak_rss_bytes'])} -> {r['destination']}",
        highlight=False,
    )
    if c := q.get("calibration"):
        out.print(
            f"calibrated on {c['tokens']} tokens of {c['file']}: {c['modules']} weights weighted by their activations; "
            f"{c['experts'] - c['experts_reached']} of {c['experts']} routed experts reached by no token (plain mse)",
            highlight=False,
        )
    t = Table(title="reconstruction error by component", title_justify="left")
    for col in ("component", "tensors", "rel. Frobenius error", "SQNR dB (pooled)", "SQNR dB mean", "SQNR dB worst"):
        t.add_column(col, justify="left" if col == "component" else "right")
    for name, c in r["quality"]["components"].items():
        t.add_row(name, str(c["tensors"]), f"{c['rel_error']:.4f}", f"{c['sqnr_db']:.2f}", f"{c['mean_sqnr_db']:.2f}", f"{c['min_sqnr_db']:.2f}")
    o = r["quality"]["overall"]
    t.add_row("all", str(r["quantized_tensors"]), f"{o['rel_error']:.4f}", f"{o['sqnr_db']:.2f}", "", "")
    out.print(t)
    if per_tensor:
        t = Table(title="per tensor", title_justify="left")
        for col in ("tensor", "scheme", "rel. error", "SQNR dB"):
            t.add_column(col, justify="left" if col in ("tensor", "scheme") else "right")
        for row in r["quality"]["tensors"]:
            t.add_row(row["tensor"], row["scheme"], f"{row['rel_error']:.4f}", f"{row['sqnr_db']:.2f}")
        out.print(t)
    if "eval" in r:
        e = r["eval"]
        out.print(
            f"perplexity on {e['text']} ({e['tokens']} tokens, window {e['window']}): {e['before']:.4f} -> {e['after']:.4f} "
            f"({100 * e['change']:+.2f}%)",
            highlight=False,
        )
    if r["verified"]:
        out.print("[green]verified: every tensor matches its source or a fresh quantization[/green]")
