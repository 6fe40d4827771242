"""Opt-in instrumentation of the model: time per component, the router's decisions, and (for
calibration) the activations entering the o_proj and MLP weights.

The model calls `section(name)` around each component and `routing(layer, logits, expert_ids)` after
each router. Both do nothing (one global lookup) unless a Recorder is active, so the fast path
stays fast; `moge profile` activates one with `with Recorder(...) as rec:`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

_active: "Recorder | None" = None
_NULL = nullcontext()


def section(name: str):
    """Context manager timing one component when a Recorder is active; a shared no-op otherwise."""
    return _NULL if _active is None else _active.section(name)


def active() -> bool:
    """A Recorder is collecting: the model runs op by op so that every section is timed."""
    return _active is not None


def routing(layer: int, logits: Any, expert_ids: Any) -> None:
    if _active is not None and _active.keep_routing:
        _active.record_routing(layer, logits, expert_ids)


def inputs(name: str, layer: int, x: Any) -> None:
    """The activations entering a layer's weight ("o_proj", "mlp"), kept when a Recorder asks (calibration)."""
    if _active is not None and _active.keep_inputs:
        _active.inputs[(name, layer)].append(x.detach())


class Recorder:
    """Collects seconds per section and, optionally, router probabilities and picks and weights' inputs per layer."""

    def __init__(self, *, sync: Any = None, keep_routing: bool = False, keep_inputs: bool = False) -> None:
        self.sync = sync  # e.g. torch.cuda.synchronize, so GPU work is charged to the right section
        self.keep_routing, self.keep_inputs = keep_routing, keep_inputs
        self.inputs: dict[tuple[str, int], list[Any]] = defaultdict(list)  # (name, layer) -> activation chunks
        self.seconds: dict[str, float] = defaultdict(float)
        self.probs: dict[int, list[Any]] = defaultdict(list)  # layer -> [T, E] float32 chunks
        self.picks: dict[int, list[Any]] = defaultdict(list)  # layer -> [T, k] int64 chunks
        self._depth = 0

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self._depth:  # nested sections are charged to the outermost one
            yield
            return
        self._depth += 1
        if self.sync:
            self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                self.sync()
            self.seconds[name] += time.perf_counter() - t0
            self._depth -= 1

    def record_routing(self, layer: int, logits: Any, expert_ids: Any) -> None:
        self.probs[layer].append(logits.float().softmax(-1).cpu())
        self.picks[layer].append(expert_ids.cpu())

    def __enter__(self) -> "Recorder":
        global _active
        if _active is not None:
            raise RuntimeError("a Recorder is already active")
        _active = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        _active = None
