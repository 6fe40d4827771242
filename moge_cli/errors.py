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
