"""Shared pieces of every command: error handling at the CLI edge, consoles, JSON output.

Importable without typer, so that `moge_cli.main`'s fast path can use it.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, TypeVar

from moge_cli.errors import debug_enabled, describe_error

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2):
    """Print `error: message` on stderr; return the typer.Exit to raise."""
    import typer

    sys.stderr.write(f"error: {message}\n")
    return typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn library exceptions into one `error:` line on stderr and an exit code (traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import typer  # already loaded whenever a Typer command runs; this module stays importable without it

        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except (KeyboardInterrupt, Exception) as e:
            if debug_enabled() and not isinstance(e, KeyboardInterrupt):
                raise
            message, code = describe_error(e)
            raise fail(message, code) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def stdout_console():
    """Rich console on stdout; when piped, wide enough that tensor names and hashes are not cut."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    return console


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def human_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
