"""Shared pieces of every command: error handling at the CLI edge, consoles, JSON output.

Importable without typer, so that `moge_cli.main`'s fast path can use it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from typing import Any, Callable, Iterator, TypeVar

from moge_cli.errors import EXIT_BROKEN_PIPE, Terminated, debug_enabled, describe_error, error_kind, error_object

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Turn library exceptions into one `error:` line on stderr and an exit code (traceback only with --debug).

    With `--json` (a parameter named as_json) the error is also one JSON object on stdout. A closed
    output pipe (`| head`) ends the command quietly with 141, as it ends other Unix tools.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import typer  # already loaded whenever a Typer command runs; this module stays importable without it

        try:
            result = fn(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
            return result
        except (typer.Exit, typer.Abort):
            raise
        except BrokenPipeError:
            raise typer.Exit(silence_broken_pipe()) from None
        except (KeyboardInterrupt, Exception) as e:
            if debug_enabled() and not isinstance(e, KeyboardInterrupt):
                raise
            raise typer.Exit(report_error(e, as_json=bool(kwargs.get("as_json")))) from None

    return wrapper  # type: ignore[return-value]


def report_error(e: BaseException, *, as_json: bool) -> int:
    """`error: ...` on stderr (and, with --json, the JSON error object on stdout); returns the exit code."""
    message, code = describe_error(e)
    if as_json:
        print_json(error_object(message, error_kind(e), code))
    sys.stderr.write(f"error: {message}\n")
    return code


def silence_broken_pipe() -> int:
    """After EPIPE: point stdout and stderr at /dev/null so that nothing fails on the way out; returns 141."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):  # a stream without a descriptor (tests)
            os.dup2(devnull, stream.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within: SIGTERM raises Terminated, so that `kill` cleans up as Ctrl-C does (then exits 143, not 130)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread only
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def stderr_console():
    from rich.console import Console

    return _pipe_aware(Console(stderr=True))


def stdout_console():
    """Rich console on stdout; when piped, wide enough that tensor names and hashes are not cut."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    return _pipe_aware(console)


def _pipe_aware(console):
    """Rich exits 1 on a closed pipe (1 is `moge load`'s "problems found"): raise instead, for handle_errors."""

    def on_broken_pipe() -> None:
        raise BrokenPipeError

    console.on_broken_pipe = on_broken_pipe
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
