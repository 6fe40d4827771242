"""The installed version, as `moge --version` prints it."""

from __future__ import annotations

DISTRIBUTION = "moge-toolkit"


def version_line() -> str:
    """`moge 0.1.0` (the installed moge-toolkit distribution's version)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"moge {version(DISTRIBUTION)}"
    except PackageNotFoundError:
        return f"moge (unknown version: {DISTRIBUTION} is not installed)"
