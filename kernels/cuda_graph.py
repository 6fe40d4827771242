"""A one-token decode step on CUDA, captured once as a CUDA graph and replayed per token.

Op by op, a decode step of a small batch is launch-bound: each of its few hundred small kernels costs a
launch from Python (issue 16 measured 232 tok/s at Pangu width, 15% of the bandwidth ceiling). A graph
replays all of them with one launch. What it needs from the model, `step_at(token, pos, cache)`, reads no
value on the host (routing, expert dispatch and combine stay on the device: experts.moe_grouped /
moe_gathered, qexperts.moe_device), and its inputs live in static buffers: the token id [1, 1], the
position [1] (a device tensor: attention masks the cache by it), the KV cache and the RoPE tables, whose
addresses the graph keeps. The logits are the graph's static output, copied out per step.

A graph belongs to one cache: a new cache (a new generation) is captured again (warm-up and capture:
a few steps' time). Where capture fails, the plan says so once and the model runs op by op.

GPU checks (tests/test_cuda.py; none has run on a GPU yet): the replayed logits equal op-by-op steps,
and steps run under torch.cuda.set_sync_debug_mode("error").
"""

from __future__ import annotations

import warnings
import weakref

import torch

WARMUP_STEPS = 2  # before capture, on a side stream (lazy set-up: cuBLAS handles, kernel selection)

class GraphStep:
    """Replays the model's `step_at(token, pos, cache)` from a CUDA graph captured for the cache it is called with
    (captured again for a new one). Reads the model duck-typed, as decode_step.plan does: step_at,
    static_positions(cache) (whether step_at can run over a cache), _rope (the RoPE tables step_at reads, held as
    long as the graph is: the graph keeps only their addresses), device, config.vocab_size. Holds the model weakly
    (the model holds its plan)."""

    def __init__(self, model) -> None:
        self._model = weakref.ref(model)
        self.device, self.vocab = model.device, model.config.vocab_size
        with torch.inference_mode(False):  # built inside a forward call, written outside one too
            self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._held: object = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output [1, 1, V] float32, overwritten by each replay
        self._cache = lambda: None  # weak reference to the cache the graph was captured for
        self.captures = 0
        self.failed: str | None = None  # why capture failed; the model then runs op by op

    def step(self, input_ids: torch.Tensor, pos: int, cache) -> torch.Tensor | None:
        """Logits [1, 1, V] float32 of token input_ids [1, 1] at position pos (< cache.max_len); writes its k and v
        to the cache. None where capture failed, the model cannot step over this cache (static_positions), or the
        id is outside the vocabulary (a host tensor's is checked here; one already on the device is not read).
        Does not advance the cache."""
        if self.failed is not None:
            return None
        if input_ids.device.type == "cpu" and not 0 <= int(input_ids) < self.vocab:
            return None  # the op-by-op path explains
        self.token.copy_(input_ids, non_blocking=True)
        self.pos.fill_(pos)  # a fill kernel: the host value goes down, nothing comes back
        if self._cache() is not cache and not self._capture(cache):
            return None
        self.graph.replay()
        return self.logits.clone()

    def _capture(self, cache) -> bool:
        """Capture step_at over `cache`; False (the model runs op by op) where it cannot step over it or capture fails."""
        model = self._model()
        if model is None or not model.static_positions(cache):
            return False
        self.graph = self.logits = None
        stream = torch.cuda.current_stream(self.device)  # a failed capture may leave its own stream current
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):  # writes k and v at pos, which the replay writes again
                    model.step_at(self.token, self.pos, cache)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = model.step_at(self.token, self.pos, cache)
        except RuntimeError as e:  # an op that cannot be captured: say so once, then run op by op
            torch.cuda.set_stream(stream)
            self.failed = f"CUDA graph capture failed, decoding op by op: {e}"
            warnings.warn(self.failed, RuntimeWarning, stacklevel=3)
            return False
        self.graph, self._cache, self._held = graph, weakref.ref(cache), model._rope
        self.captures += 1
        return True


def plan(model) -> GraphStep | None:
    """A GraphStep for a model on a CUDA device (its step_at), or None where there is no CUDA."""
    if model.device.type != "cuda" or not torch.cuda.is_available():
        return None
    return GraphStep(model)
