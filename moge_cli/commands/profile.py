"""`moge profile`: time per component, bandwidth, routing balance (MoGE vs top-k), perplexity, weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from moge_cli.commands.common import handle_errors, human_bytes, print_json, stderr_console, stdout_console


@handle_errors
def profile_command(
    model: str = typer.Argument(..., help="Checkpoint directory, .safetensors file, or cached Hugging Face repo id."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text to run through the model."),
    text_file: Optional[Path] = typer.Option(None, "--text-file", help="Run this file's text through the model."),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="Token ids, e.g. 1,2,3 (no tokenizer needed)."),
    decode: int = typer.Option(32, "--decode", help="Greedy tokens to decode after the prompt."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: the checkpoint's)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, ..."),
    devices: Optional[int] = typer.Option(None, "--devices", help="Devices whole expert groups are placed on for the Imbalance Score (default: one group per device)."),
    perplexity: Optional[Path] = typer.Option(None, "--perplexity", help="Also report perplexity on this text file."),
    weights: bool = typer.Option(False, "--weights", help="Also stream per-tensor weight statistics."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG heatmap of expert load and per-layer IS (needs moge-toolkit[plot])."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Revision of a Hugging Face repo id (cache only)."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON on stdout."),
) -> None:
    """Profile a MoGE checkpoint: where the time, the memory and the tokens go."""
    from moge_cli.commands.generate import parse_ids
    from moge_cli.profiling import profile

    err = stderr_console()
    report = profile(
        model,
        prompt=prompt,
        text_file=text_file,
        prompt_ids=parse_ids(prompt_ids) if prompt_ids is not None else None,
        decode=decode,
        dtype=dtype,
        device=device,
        devices=devices,
        perplexity_file=perplexity,
        weights=weights,
        revision=revision,
        progress=lambda msg: err.print(f"[dim]{msg}...[/dim]"),
    )
    if plot is not None:
        from moge_cli.plot import plot_routing

        report["plot"] = str(plot_routing(report, plot))
    if as_json:
        print_json(report)
    else:
        render(report)


def _pct(x: float) -> str:
    return f"{x:.1f}%"


def render(r: dict[str, Any]) -> None:
    from rich.table import Table

    out = stdout_console()
    bw = r["bandwidth"]
    out.print(f"[bold]{r['model']}[/bold]  ({r['dtype']} on {r['device']})")
    if r["prompt_tokens_given"] > r["prompt_tokens"]:
        out.print(f"[yellow]the text has {r['prompt_tokens_given']} tokens; profiled the first {r['prompt_tokens']} (context length)[/yellow]")
    out.print(
        f"prefill {r['prompt_tokens']} tokens: {r['prefill']['tokens_per_s']:.1f} tok/s   "
        f"decode {r['decode']['tokens']} tokens: {r['decode']['tokens_per_s']:.1f} tok/s "
        f"({r['decode']['op_by_op_tokens_per_s']:.1f} op by op, timed per component below)   "
        f"peak memory {human_bytes(r['peak_memory_bytes'])}"
    )
    out.print(
        f"decode weight bandwidth: {human_bytes(bw['achieved_bytes_per_s'])}/s of {human_bytes(bw['measured_read_bytes_per_s'])}/s "
        f"measured = {_pct(bw['percent_of_measured'])} ({human_bytes(bw['active_weight_bytes_per_token'])} active weights per token; "
        f"ceiling {bw['decode_ceiling_tokens_per_s']:.1f} tok/s)"
    )
    t = Table(title="time per component", title_justify="left")
    for col in ("component", "prefill s", "prefill %", "decode s", "decode %"):
        t.add_column(col, justify="left" if col == "component" else "right")
    pre, dec = r["prefill"]["components"], r["decode"]["components"]
    for comp in pre:
        t.add_row(comp, f"{pre[comp]['seconds']:.4f}", _pct(pre[comp]["percent"]), f"{dec[comp]['seconds']:.4f}", _pct(dec[comp]["percent"]))
    out.print(t)

    rt = r["routing"]
    t = Table(title=f"routing over {rt['tokens']} tokens, expert groups on {rt['devices']} devices", title_justify="left")
    for col in ("layer", "min", "max", "mean", "never picked", "entropy (bits)", "IS MoGE", "IS top-k", "top-k / MoGE"):
        t.add_column(col, justify="right")
    for l in rt["layers"]:
        ratio = "inf (MoGE balanced)" if l["imbalance_ratio"] is None and l["imbalance_topk"] > 0 else (
            "-" if l["imbalance_ratio"] is None else f"{l['imbalance_ratio']:.2f}x")  # fmt: skip
        t.add_row(
            str(l["layer"]), str(l["min"]), str(l["max"]), f"{l['mean']:.1f}", str(len(l["never_picked"])),
            f"{l['entropy_bits']:.2f} / {l['max_entropy_bits']:.2f}", f"{l['imbalance_moge']:.3f}", f"{l['imbalance_topk']:.3f}", ratio,
        )  # fmt: skip
    out.print(t)
    out.print(f"mean Imbalance Score: MoGE {rt['mean_imbalance_moge']:.3f} vs plain top-k {rt['mean_imbalance_topk']:.3f}")
    if "generated_text" in r:
        out.print(f"greedy continuation: {r['generated_text']!r}", soft_wrap=True)
    if "perplexity" in r:
        p = r["perplexity"]
        out.print(f"perplexity {p['perplexity']:.3f} over {p['tokens']} tokens (window {p['window']}, stride {p['stride']})")
    if "weights" in r:
        w = r["weights"]
        t = Table(title="weights by component", title_justify="left")
        for col in ("component", "tensors", "params", "absmax", "mean std", "outliers >6 sigma", "fp16 overflow", "zeros"):
            t.add_column(col, justify="left" if col == "component" else "right")
        for comp, c in w["components"].items():
            t.add_row(
                comp, str(c["tensors"]), f"{c['numel']:,}", f"{c['absmax']:.4g}", f"{c['mean_std']:.4g}",
                f"{100 * c['outlier_fraction']:.3f}%", str(c["fp16_overflow"]), f"{100 * c['zero_fraction']:.2f}%",
            )  # fmt: skip
        out.print(t)
        out.print(f"advice: {w['advice']}", soft_wrap=True)
    if "plot" in r:
        out.print(f"wrote {r['plot']}")
