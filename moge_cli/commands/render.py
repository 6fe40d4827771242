"""What `moge convert` and `moge quantize` both print: the conversion's notes and the --dry-run plan."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moge_cli.commands.common import human_bytes, stderr_console, stdout_console

if TYPE_CHECKING:
    from moge_converters.convert import ConvertResult, DryRunPlan


def print_notes(result: ConvertResult | DryRunPlan, quiet: bool) -> None:
    if not quiet:
        for note in result.notes:
            stderr_console().print(f"note: {note}", highlight=False)


def render_plan(r: DryRunPlan, verbose: bool = False) -> None:
    """The --dry-run plan: totals and one line per shard; every tensor only when verbose (--json has them all)."""
    from rich.table import Table

    out = stdout_console()
    out.print(
        f"plan: {r.source} -> {r.destination}: layout {r.src_layout} -> {r.layout}, {r.tensors} tensors, {len(r.outputs)} shard(s)",
        highlight=False,
    )
    changes = ", ".join(f"{k}: {n} tensors" for k, n in r.dtype_changes.items()) or "none"
    out.print(f"dtype changes: {changes}", highlight=False)
    out.print(
        f"disk: {human_bytes(r.disk_bytes)}; estimated peak anonymous memory: {human_bytes(r.estimated_peak_rss_bytes)} "
        f"(largest tensor {human_bytes(r.largest_tensor_bytes)}); copied: {', '.join(r.copied_files) or 'nothing'}",
        highlight=False,
    )
    for shard in r.outputs:
        if not verbose:
            out.print(f"  {shard['file']}: {len(shard['tensors'])} tensors, {human_bytes(shard['bytes'])}", highlight=False)
            continue
        t = Table(title=f"{shard['file']}  ({human_bytes(shard['bytes'])})", title_justify="left")
        for col in ("tensor", "dtype", "shape", "bytes", "from"):
            t.add_column(col, justify="right" if col == "bytes" else "left")
        for row in shard["tensors"]:
            t.add_row(row["name"], row["dtype"], str(row["shape"]), f"{row['bytes']:,}", row["from"])
        out.print(t)
    if r.ep_plan:
        for rank in r.ep_plan["ranks"]:
            out.print(f"{rank['path']}: groups {rank['groups']}, experts {rank['experts']}", highlight=False)
    out.print("dry run: nothing written" + ("" if verbose else " (--verbose lists every tensor)"))
