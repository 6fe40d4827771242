"""The `moge` entry point.

`moge load PATH --json`, what conversion pipelines call most, runs here without importing typer
(about a third of the start-up); every other command line goes to the Typer app in cli.py. The fast
path takes exactly that form and nothing else, and prints what `load_command` prints.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    path = plain_load_json(argv)
    if path is not None:
        sys.exit(load_json(path))
    from moge_cli.cli import app

    app(args=argv, prog_name="moge")


def plain_load_json(argv: list[str]) -> str | None:
    """PATH if argv is `load PATH --json` or `load --json PATH`; None for anything else."""
    if len(argv) != 3 or argv[0] != "load" or "--json" not in argv[1:]:
        return None
    (path,) = [a for a in argv[1:] if a != "--json"] or [None]
    return path if path is not None and not path.startswith("-") else None


def load_json(path: str) -> int:
    """`moge load PATH --json`: print the report; exit code 0 healthy, 1 problems, 2 unreadable."""
    from moge_cli.commands.common import print_json
    from moge_cli.errors import debug_enabled, describe_error
    from moge_cli.inspect import inspect_checkpoint

    try:
        report = inspect_checkpoint(path)
    except (KeyboardInterrupt, Exception) as e:
        if debug_enabled() and not isinstance(e, KeyboardInterrupt):
            raise
        message, code = describe_error(e)
        sys.stderr.write(f"error: {message}\n")
        return code
    print_json(report)
    return 1 if report["problems"] else 0
