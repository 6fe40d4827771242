"""`moge load`: inspect and validate a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import typer

from moge_cli.commands.common import handle_errors, human_bytes, human_count, print_json, stderr_console, stdout_console
from moge_cli.commands.options import DEVICE, DTYPE, JSON, QUIET, REVISION

if TYPE_CHECKING:
    from moge_cli.inspect import CheckpointReport


@handle_errors
def load_command(
    path: str = typer.Argument(..., help="Checkpoint directory, .safetensors file, or cached Hugging Face repo id (org/name)."),
    glob: Optional[str] = typer.Argument(None, metavar="[GLOB]", help="With --tensors: list only tensors matching GLOB."),
    revision: REVISION = None,
    tensors: bool = typer.Option(False, "--tensors", help="List tensors: name, dtype, shape, shard, bytes (filter with GLOB)."),
    verify: bool = typer.Option(False, "--verify", help="Stream every tensor: NaN/Inf, all-zero, sha256 of every shard."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="With verification: write shard hashes to FILE."),
    check: Optional[Path] = typer.Option(None, "--check", help="Verify shard hashes against a manifest FILE."),
    device: DEVICE = None,
    dtype: DTYPE = None,
    quiet: QUIET = False,
    as_json: JSON = False,
) -> None:
    """Inspect and validate a MoGE checkpoint. With --device (and --dtype): also whether the model fits that device
    (weights + KV cache + activations against its free memory; headers only, as generate checks before loading).

    Exit codes: 0 healthy, 1 problems found, 2 error (unreadable checkpoint, bad usage), 130 Ctrl-C, 141 output pipe closed.
    """
    from moge_cli.inspect import inspect_checkpoint

    if device is not None:
        from moge_cli.devices import check_device

        check_device(device)
    streaming = verify or manifest is not None or check is not None
    listing = glob or "*" if tensors or glob else None
    options = dict(revision=revision, verify=streaming, manifest=manifest, check=check, tensors=listing, device=device, dtype=dtype)
    if streaming and not (as_json or quiet):
        report = _with_progress(lambda progress: inspect_checkpoint(path, progress=progress, **options))
    else:
        report = inspect_checkpoint(path, **options)
    if as_json:
        print_json(report.to_dict())
    else:
        render(report)
    if report.problems:
        raise typer.Exit(1)


def _with_progress(run: Callable[[Callable[[int, int], None]], CheckpointReport]) -> CheckpointReport:
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    columns = ("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=stderr_console(), transient=True) as bar:
        task = bar.add_task("verifying", total=None)
        return run(lambda n, total: bar.update(task, advance=n, total=total))


def render(report: CheckpointReport) -> None:
    from rich.table import Table

    out = stdout_console()
    r, p = report, report.params
    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_column(style="bold cyan")
    summary.add_column()
    rows = [
        ("path", r.path),
        ("architecture", f"{r.model_type}  ({r.num_layers} layers, hidden {r.hidden_size}, vocab {r.vocab_size})"),
        ("attention", f"{r.num_attention_heads} heads / {r.num_key_value_heads} kv heads, head_dim {r.head_dim}"),
        (
            "experts",
            f"{r.num_experts} = {r.num_groups} groups x {r.experts_per_group} experts, "
            f"{r.picks_per_group} pick(s) per group ({r.num_experts_per_tok} per token); "
            f"width {r.moe_intermediate_size}, shared expert {r.shared_expert_intermediate_size}",
        ),
        ("dense layers", ", ".join(map(str, r.dense_layers)) or "none"),
        ("layout", r.layout),
        ("dtype", r.dtype or "-"),
        ("shards", f"{len(r.shards)} file(s), {human_bytes(r.size_bytes)} on disk, {r.num_tensors} tensors"),
        ("parameters", f"{human_count(p['total'])} total, {human_count(p['active'])} active per token ({p['total']:,} / {p['active']:,})"),
    ]
    if (e := r.ep) is not None:  # one rank of `moge convert --ep`
        rows.append(("expert parallel", f"{e.explanation}; its experts are stored by local id 0..{len(e.experts) - 1}"))
    if r.ep_plan is not None:  # the top directory of a split
        rows.append(("expert parallel", "; ".join(f"{x['path']}: experts {x['experts'][0]}..{x['experts'][-1]}" for x in r.ep_plan["ranks"])))
    if (q := r.quantization) is not None:  # `moge quantize` output (compressed-tensors)
        comps = ", ".join(f"{c} {n}" for c, n in q.components.items())
        cal = q.calibration
        method = q.method + (f" calibrated on {cal['tokens']} tokens of {cal['file']}" if cal else "")
        rows.append(("quantization", f"{q.format}: {', '.join(f'{s} x{n}' for s, n in q.schemes.items())}, method {method}; {q.tensors} tensors ({comps})"))
        rows.append(("quantized bytes", f"{human_bytes(q.quantized_bytes)} for {human_count(q.quantized_params)} weights "
                     f"({q.bits_per_quantized_weight:.2f} bits each, scales included); float tensors {human_bytes(q.float_bytes)}"))  # fmt: skip
    if (m := r.memory_plan) is not None:
        verdict = {True: "fits", False: "[red]does not fit[/red]", None: "free memory unknown"}[m.fits]
        rows.append(("memory plan", f"{verdict}: {m.summary()}"))
    rows += [("note", note) for note in r.notes]  # skipped buffers, tied embeddings, rope_scaling
    for k, v in rows:
        summary.add_row(k, v)
    out.print(summary)

    breakdown = Table(title="parameters by component", title_justify="left")
    for col in ("component", "total", "active", "share"):
        breakdown.add_column(col, justify="left" if col == "component" else "right")
    for comp in ("embeddings", "attention", "router", "routed_experts", "shared_experts", "dense_mlp", "norms", "lm_head"):
        if p[comp]:
            active = p["active_routed_experts"] if comp == "routed_experts" else p[comp]
            breakdown.add_row(comp, f"{p[comp]:,}", f"{active:,}", f"{100 * p[comp] / p['total']:.1f}%")
    out.print(breakdown)

    if (v := r.verify) is not None:
        out.print(f"verified {v.tensors_checked} tensors: {v.nan} NaN, {v.inf} Inf, {v.all_zero_tensors} all-zero")
        for name, f in v.files.items():
            out.print(f"  {f['sha256']}  {name}", soft_wrap=True)
    if r.tensors is not None:
        t = Table(title=f"{len(r.tensors)} tensors", title_justify="left")
        for col in ("name", "dtype", "shape", "shard", "bytes"):
            t.add_column(col, justify="right" if col == "bytes" else "left")
        for row in r.tensors:
            t.add_row(row["name"], row["dtype"], str(row["shape"]), row["shard"], f"{row['bytes']:,}")
        out.print(t)

    problems = r.problems
    if not problems:
        out.print("[green]no problems found[/green]")
        return
    t = Table(title=f"{len(problems)} problem(s)", title_justify="left", title_style="bold red")
    for col in ("kind", "tensor", "detail"):
        t.add_column(col)
    for pr in problems[:50]:
        t.add_row(pr.kind, pr.tensor, pr.detail)
    out.print(t)
    if len(problems) > 50:
        out.print(f"... and {len(problems) - 50} more (use --json for all)")
