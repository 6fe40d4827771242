"""Root Typer app: registers one module per command and handles errors once, at the edge.

The `moge` entry point is moge_cli.main, which hands everything but `load PATH --json` and
`--version` to `app`.
"""

from __future__ import annotations

import typer

from moge_cli.commands import convert, fixture, generate, load, profile, quantize
from moge_cli.version import version_line

app = typer.Typer(
    name="moge",
    help="Load, convert, quantize, profile and run Mixture-of-Grouped-Experts (Pangu Pro MoE) checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        print(version_line())
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks (same as MOGE_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", "-V", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    if debug:
        import os

        os.environ["MOGE_DEBUG"] = "1"


app.command("load")(load.load_command)
app.command("generate")(generate.generate_command)
app.command("convert")(convert.convert_command)
app.command("profile")(profile.profile_command)
app.command("quantize")(quantize.quantize_command)
app.command("fixture")(fixture.fixture_command)
