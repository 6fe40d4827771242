"""`moge profile`: time per component, bandwidth, routing balance (MoGE vs top-k), perplexity, weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from moge_cli.commands.common import handle_errors, human_bytes, print_json, stderr_console, stdout_console
from moge_cli.commands.options import (
    ALIAS_DECODE, ALIAS_TEXT_FILE, DEVICE, DTYPE, EP, JSON, MAX_NEW_TOKENS, PERPLEXITY, PROMPT, PROMPT_FILE, PROMPT_IDS, QUIET, REVISION,
    THREADS, apply_threads, either, parse_ids,
)  # fmt: skip

from moge_cli.errors import UsageError

if TYPE_CHECKING:
    from moge_cli.profiling import ProfileReport

DEFAULT_MAX_NEW_TOKENS = 32


@handle_errors
def profile_command(
    model: str = typer.Argument(..., help="Checkpoint directory, .safetensors file, or cached Hugging Face repo id."),
    prompt: PROMPT = None,
    prompt_file: PROMPT_FILE = None,
    prompt_ids: PROMPT_IDS = None,
    max_new_tokens: MAX_NEW_TOKENS = DEFAULT_MAX_NEW_TOKENS,
    dtype: DTYPE = None,
    device: DEVICE = "cpu",
    threads: THREADS = None,
    ep: EP = None,
    devices: Optional[int] = typer.Option(None, "--devices", help="Devices whole expert groups are placed on for the Imbalance Score (default: one group per device)."),
    perplexity: PERPLEXITY = None,
    weights: bool = typer.Option(False, "--weights", help="Also stream per-tensor weight statistics."),
    plot: Optional[Path] = typer.Option(None, "--plot", metavar="PNG", help="Write a PNG heatmap of expert load and per-layer IS (needs moge-toolkit\\[plot])."),
    revision: REVISION = None,
    quiet: QUIET = False,
    as_json: JSON = False,
    text_file: ALIAS_TEXT_FILE = None,
    decode: ALIAS_DECODE = None,
) -> None:
    """Profile a MoGE checkpoint: where the time, the memory and the tokens go.

    Prefill of the prompt (--prompt, --file or --prompt-ids), then -n greedy tokens, timed per component; routing balance per layer; optionally perplexity, weight statistics and a plot.

    Exit codes: 0 done, 2 error or bad usage (checked before the model loads: --device, --plot's matplotlib), 130 Ctrl-C, 141 output pipe closed.
    """
    from moge_cli.distributed import launched_world
    from moge_cli.ep import refuse_rank_directory
    from moge_cli.profiling import profile

    ep = launched_world(ep)  # under torchrun: its WORLD_SIZE

    refuse_rank_directory(model)  # one rank of `convert --ep`: say so, before loading anything
    if plot is not None:
        from moge_cli.plot import check_plot_target

        check_plot_target(plot)  # before minutes of profiling, not after
    apply_threads(threads)
    if ep is not None:
        profile_ranks(model, ep, prompt=prompt, text_file=either(prompt_file, text_file, None), prompt_ids=prompt_ids,
                      decode=either(max_new_tokens, decode, DEFAULT_MAX_NEW_TOKENS), dtype=dtype, device=device, revision=revision,
                      others=dict(devices=devices, perplexity=perplexity, weights=weights or None, plot=plot), as_json=as_json)  # fmt: skip
        return
    err = stderr_console()
    report = profile(
        model,
        prompt=prompt,
        text_file=either(prompt_file, text_file, None),
        prompt_ids=parse_ids(prompt_ids) if prompt_ids is not None else None,
        decode=either(max_new_tokens, decode, DEFAULT_MAX_NEW_TOKENS),
        dtype=dtype,
        device=device,
        devices=devices,
        perplexity_file=perplexity,
        weights=weights,
        revision=revision,
        progress=None if quiet else (lambda msg: err.print(f"[dim]{msg}...[/dim]")),
    )
    if plot is not None:
        from moge_cli.plot import plot_routing

        report.plot = str(plot_routing(report.to_dict(), plot))
    if as_json:
        print_json(report.to_dict())
    else:
        render(report)


def profile_ranks(model: str, world: int, *, prompt_ids: Optional[str], others: dict[str, Any], as_json: bool, **options: Any) -> None:
    """--ep N: prefill and greedy decode on N ranks; speed and per-rank statistics (no per-component table)."""
    from moge_cli.distributed import profile_on_ranks, rank_lines

    given = [f"--{name}" for name, value in others.items() if value is not None]
    if given:
        raise UsageError(f"--ep profiles speed and per-rank balance only; drop {', '.join(given)} (or run without --ep)")
    report = profile_on_ranks(model, world, prompt_ids=parse_ids(prompt_ids) if prompt_ids is not None else None, **options)
    if report is None:  # a torchrun rank other than 0: rank 0 prints
        return
    if as_json:
        print_json(report.to_dict())
        return
    out = stdout_console()
    out.print(f"[bold]{report.model}[/bold]  (on {report.device})")
    pre, dec = report.prefill, report.decode
    out.print(f"prefill {pre.tokens} tokens: {pre.tokens_per_s:.1f} tok/s   decode {dec.tokens} tokens: {dec.tokens_per_s:.1f} tok/s")
    for line in rank_lines(report.ep):
        out.print(line, soft_wrap=True)


def _pct(x: float) -> str:
    return f"{x:.1f}%"


def render(r: ProfileReport) -> None:
    from rich.table import Table

    out = stdout_console()
    bw = r.bandwidth
    out.print(f"[bold]{r.model}[/bold]  ({r.dtype} on {r.device})")
    if r.prompt_tokens_given > r.prompt_tokens:
        out.print(f"[yellow]the text has {r.prompt_tokens_given} tokens; profiled the first {r.prompt_tokens} (context length)[/yellow]")
    out.print(
        f"prefill {r.prompt_tokens} tokens: {r.prefill.tokens_per_s:.1f} tok/s   "
        f"decode {r.decode.tokens} tokens: {r.decode.tokens_per_s:.1f} tok/s "
        f"({r.decode.op_by_op_tokens_per_s:.1f} op by op, timed per component below)   "
        f"peak memory {human_bytes(r.peak_memory_bytes)}"
    )
    out.print(
        f"decode weight bandwidth: {human_bytes(bw.achieved_bytes_per_s)}/s of {human_bytes(bw.measured_read_bytes_per_s)}/s "
        f"measured = {_pct(bw.percent_of_measured)} ({human_bytes(bw.active_weight_bytes_per_token)} active weights per token; "
        f"ceiling {bw.decode_ceiling_tokens_per_s:.1f} tok/s)"
    )
    t = Table(title="time per component", title_justify="left")
    for col in ("component", "prefill s", "prefill %", "decode s", "decode %"):
        t.add_column(col, justify="left" if col == "component" else "right")
    pre, dec = r.prefill.components, r.decode.components
    for comp in pre:
        t.add_row(comp, f"{pre[comp]['seconds']:.4f}", _pct(pre[comp]["percent"]), f"{dec[comp]['seconds']:.4f}", _pct(dec[comp]["percent"]))
    out.print(t)

    rt = r.routing
    t = Table(title=f"routing over {rt.tokens} tokens, expert groups on {rt.devices} devices", title_justify="left")
    for col in ("layer", "min", "max", "mean", "never picked", "entropy (bits)", "IS MoGE", "IS top-k", "top-k / MoGE"):
        t.add_column(col, justify="right")
    for l in rt.layers:
        ratio = "inf (MoGE balanced)" if l["imbalance_ratio"] is None and l["imbalance_topk"] > 0 else (
            "-" if l["imbalance_ratio"] is None else f"{l['imbalance_ratio']:.2f}x")  # fmt: skip
        t.add_row(
            str(l["layer"]), str(l["min"]), str(l["max"]), f"{l['mean']:.1f}", str(len(l["never_picked"])),
            f"{l['entropy_bits']:.2f} / {l['max_entropy_bits']:.2f}", f"{l['imbalance_moge']:.3f}", f"{l['imbalance_topk']:.3f}", ratio,
        )  # fmt: skip
    out.print(t)
    out.print(f"mean Imbalance Score: MoGE {rt.mean_imbalance_moge:.3f} vs plain top-k {rt.mean_imbalance_topk:.3f}")
    if r.generated_text is not None:
        out.print(f"greedy continuation: {r.generated_text!r}", soft_wrap=True)
    if (p := r.perplexity) is not None:
        out.print(f"perplexity {p['perplexity']:.3f} over {p['tokens']} tokens (window {p['window']}, stride {p['stride']})")
    if (w := r.weights) is not None:
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
    if r.plot is not None:
        out.print(f"wrote {r.plot}")
