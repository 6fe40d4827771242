"""moge: load, convert, quantize, profile and run Mixture-of-Grouped-Experts checkpoints.

The public Python API, imported on first use (PEP 562) so that `moge --help` pays for none of it.
Nothing here imports torch until a model is loaded.
"""

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS = {
    "Checkpoint": "moge_cli.checkpoint",
    "open_checkpoint": "moge_cli.checkpoint",
    "MoGEConfig": "moge_cli.config",
    "PRESETS": "moge_cli.config",
    "MogeError": "moge_cli.errors",
    "CheckpointError": "moge_cli.errors",
    "ConfigError": "moge_cli.errors",
    "UsageError": "moge_cli.errors",
    "inspect_checkpoint": "moge_cli.inspect",
    "CheckpointReport": "moge_cli.inspect",
    "GenerationResult": "moge_cli.generate",
    "ProfileReport": "moge_cli.profiling",
    "MemoryPlan": "moge_cli.memory_plan",
    "load_model": "moge_cli.loader",
    "profile": "moge_cli.profiling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moge_cli' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
