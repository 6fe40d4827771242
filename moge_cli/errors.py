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


def debug_enabled() -> bool:
    """--debug or MOGE_DEBUG=1: let tracebacks through instead of one-line errors."""
    import os

    return os.environ.get("MOGE_DEBUG", "") not in ("", "0")


def describe_error(e: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) the CLI reports for an exception that escaped a command."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(e, MogeError):
        return str(e), e.exit_code
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}", 2
    return f"unexpected {type(e).__name__}: {e} (run with --debug for the traceback)", 2  # a bug: say so plainly
