"""The `moge` entry point.

`moge load PATH --json`, what conversion pipelines call most, and `moge --version` run here without
importing typer (about a third of the start-up); every other command line goes to the Typer app in
cli.py. The fast path takes exactly that form and nothing else, and prints what `load_command`
prints. Here, at the edge of every command: a closed output pipe ends quietly (141), and with
`--json` a failure, usage errors included, is also one JSON object on stdout.
"""

from __future__ import annotations

import os
import sys

from moge_cli.version import version_line


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["--version"], ["-V"]):
        print(version_line())
        return
    path = plain_load_json(argv)
    sys.exit(load_json(path) if path is not None else run_app(argv))


def run_app(argv: list[str]) -> int:
    """The Typer app on argv; returns the exit code. Usage errors print as Typer prints them (and as JSON with --json)."""
    import typer

    from moge_cli.cli import app
    from moge_cli.commands.common import print_json, silence_broken_pipe
    from moge_cli.errors import error_object

    try:
        code = app(args=argv, prog_name="moge", standalone_mode=False)
        sys.stdout.flush()
        return code if isinstance(code, int) else 0
    except typer.TyperException as e:  # click's exceptions: bad option, missing argument, bad --dtype...
        _show_usage_error(e)
        code = getattr(e, "exit_code", 2)
        if "--json" in argv:
            print_json(error_object(e.format_message(), "usage", code))
        return code
    except typer.Abort:
        sys.stderr.write("Aborted!\n")
        return 1
    except BrokenPipeError:  # `moge ... --help | head -1`: the commands themselves handle their own
        return silence_broken_pipe()
    except SystemExit as e:  # `moge --help | head -1`: the help's printer answers EPIPE with exit 1; as the commands: 141
        if e.code == 1 and _stdout_pipe_closed():
            return silence_broken_pipe()
        raise


def _stdout_pipe_closed() -> bool:
    """EPIPE on stdout, as the libraries leave it before exiting 1: rich (Console.on_broken_pipe) points
    descriptor 1 at /dev/null, click swaps in its PacifyFlushWrapper."""
    if type(sys.stdout).__name__ == "PacifyFlushWrapper":
        return True
    try:
        return os.path.samestat(os.fstat(sys.stdout.fileno()), os.stat(os.devnull))
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (tests)
        return False


def _show_usage_error(e) -> None:
    try:
        from typer import rich_utils

        rich_utils.rich_format_error(e)
    except ImportError:  # typer without rich
        e.show()


def plain_load_json(argv: list[str]) -> str | None:
    """PATH if argv is `load PATH --json` or `load --json PATH`; None for anything else."""
    if len(argv) != 3 or argv[0] != "load" or "--json" not in argv[1:]:
        return None
    (path,) = [a for a in argv[1:] if a != "--json"] or [None]
    return path if path is not None and not path.startswith("-") else None


def load_json(path: str) -> int:
    """`moge load PATH --json`: print the report; exit code 0 healthy, 1 problems, 2 unreadable (a JSON error object too)."""
    from moge_cli.commands.common import print_json, report_error, silence_broken_pipe
    from moge_cli.errors import debug_enabled
    from moge_cli.inspect import inspect_checkpoint

    try:
        report = inspect_checkpoint(path)
        print_json(report.to_dict())
        sys.stdout.flush()
    except BrokenPipeError:
        return silence_broken_pipe()
    except (KeyboardInterrupt, Exception) as e:
        if debug_enabled() and not isinstance(e, KeyboardInterrupt):
            raise
        return report_error(e, as_json=True)
    return 1 if report.problems else 0
