"""moge: load, convert, quantize, profile and run Mixture-of-Grouped-Experts checkpoints.

The public Python API. Nothing here imports torch at import time.
"""

from moge_cli.checkpoint import Checkpoint, open_checkpoint
from moge_cli.config import PRESETS, MoGEConfig
from moge_cli.errors import CheckpointError, ConfigError, MogeError, UsageError
from moge_cli.inspect import inspect_checkpoint

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "MoGEConfig",
    "MogeError",
    "PRESETS",
    "UsageError",
    "inspect_checkpoint",
    "open_checkpoint",
]
