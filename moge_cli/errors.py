"""Domain exceptions: library code raises these; the CLI turns them into one-line errors."""


class MogeError(Exception):
    """Base class. `exit_code` is what the CLI exits with when this escapes a command."""

    exit_code = 2


class ConfigError(MogeError):
    """config.json is missing, unreadable, or inconsistent."""


class CheckpointError(MogeError):
    """A checkpoint file or index cannot be trusted (bad header, bad offsets, missing shard...)."""


class UsageError(MogeError):
    """The caller asked for something that cannot be done (bad option value, bad destination...)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception: everything cleans up as on Ctrl-C, but the exit code is 143 (128 + 15)."""


EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what `seq 1e9 | head -1` leaves; nothing is printed
EXIT_TERMINATED = 143  # 128 + SIGTERM



def debug_enabled() -> bool:
    """--debug or MOGE_DEBUG=1: let tracebacks through instead of one-line errors."""
    import os

    return os.environ.get("MOGE_DEBUG", "") not in ("", "0")


def describe_error(e: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) the CLI reports for an exception that escaped a command."""
    if isinstance(e, Terminated):
        return "terminated", EXIT_TERMINATED
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(e, MogeError):
        return str(e), e.exit_code
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}", 2
    return f"unexpected {type(e).__name__}: {e} (run with --debug for the traceback)", 2  # a bug: say so plainly


def error_kind(e: BaseException) -> str:
    """The `kind` in a --json error object: the MogeError subclass it descends from, without "Error" (usage, config,
    checkpoint, verify, write...), else os | interrupted | terminated | bug."""
    if isinstance(e, KeyboardInterrupt):
        return "terminated" if isinstance(e, Terminated) else "interrupted"
    if isinstance(e, MogeError):
        top = next(c for c in type(e).__mro__ if c is MogeError or MogeError in c.__bases__)
        return "error" if top is MogeError else top.__name__.removesuffix("Error").lower()
    return "os" if isinstance(e, OSError) else "bug"


def error_object(message: str, kind: str, exit_code: int) -> dict:
    """What `--json` prints on stdout when a command fails: {"error", "kind", "exit_code"}."""
    return {"error": message, "kind": kind, "exit_code": exit_code}
