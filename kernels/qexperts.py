"""Routed experts of quantized stacks without host round-trips: for CUDA (and any device); runs on the CPU too.

`moe_device(x, expert_ids, weights, gate_up, down)` computes what ops._quantized_experts computes (each token's
k experts' SwiGLU outputs in the model dtype, summed in float32 with the routing weights) without .tolist(),
.item(), nonzero or a Python list of ids: the picked experts stay device tensors, so a decode step can run
under torch.cuda.set_sync_debug_mode("error") and be captured in a CUDA graph.

Two ways, chosen from shapes only (P = T*k picked (token, expert) pairs against E experts):
  P <= E  (decode, a few tokens)  `_picked`: gather the P picked experts' stored integers and dequantise only those.
  P >  E  (prefill)               `_every_expert`: each of the E experts on all T tokens, masked by the routing.
Dimension letters: T tokens, k experts per token, P = T*k pairs, E experts, H hidden, I expert width (gate_up: 2I rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moge_kernels.experts import combine_f32
from moge_kernels.qlinear import QLinear


def moe_device(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate_up: QLinear, down: QLinear) -> torch.Tensor:
    """x [T, H] (model dtype), expert_ids [T, k] int64, weights [T, k] float32; gate_up / down QLinear stacks of E
    experts ([2I, H] / [H, I] each) -> float32 [T, H], with no host sync."""
    T, k = expert_ids.shape
    if T * k <= gate_up.num_experts and gate_up.dequantizable and down.dequantizable:
        return _picked(x, expert_ids, weights, gate_up, down)
    return _every_expert(x, expert_ids, weights, gate_up, down)


def _picked(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate_up: QLinear, down: QLinear) -> torch.Tensor:
    """The P picked experts, dequantised into [P, N, K] stacks (QLinear.dequantized_experts: an index gather),
    then one batched matmul per projection.

    Cost per projection, eagerly: the P experts' integers gathered, cast, scaled and the bf16 copy read back by
    bmm: ~11 bytes moved per weight for int8 (1 stored), ~14 for cuda_int4 (0.5 stored), in ~6-9 launches for
    any k, no sync. Under torch.compile (_matvecs) inductor fuses the gather, unpacking, dequantisation and both
    matvecs into one kernel with only [P, N] buffers (seen on the CPU backend), reading just the picked
    experts' integers: the decode path for bandwidth; eagerly this is the correct, sync-free fallback.
    """
    T, k = expert_ids.shape
    ids = expert_ids.reshape(-1)  # [P], token-major: pair p = (p // k, p % k)
    xs = x.unsqueeze(1).expand(T, k, x.shape[-1]).reshape(T * k, 1, -1)  # [P, 1, H]
    gate, up = _matvecs(xs, gate_up.dequantized_experts(ids, x.dtype)).chunk(2, dim=-1)  # [P, 1, I] each
    y = _matvecs(F.silu(gate) * up, down.dequantized_experts(ids, x.dtype))  # [P, 1, H]
    return combine_f32(y.view(T, k, -1), weights)


def _matvecs(xs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """xs [P, 1, K] @ w[P].T for w [P, N, K] -> [P, 1, N] in xs' dtype (float32 accumulation either way).

    Under torch.compile a multiply and a sum over K: inductor fuses the producers of w (the gather by expert id,
    the dequantisation) into that one reduction, which then reads only the picked experts' integers (gpt-fast's
    mixtral-moe int8 does the same). Eagerly that form would write [P, N, K] products, so a batched GEMM."""
    if torch.compiler.is_compiling():
        return (xs * w).sum(-1, dtype=torch.float32).to(xs.dtype).unsqueeze(1)
    return torch.bmm(xs, w.transpose(1, 2))


def _every_expert(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate_up: QLinear, down: QLinear) -> torch.Tensor:
    """Every expert on every token, its result kept where the router picked it (a Python loop over E, an int
    from the shapes: no sync).

    Cost: each expert's weights read once (QLinear.forward: MANY_TOKENS or more dequantise it for one GEMM), as
    any prefill reads them, but E/k times the routed FLOPs: fine while a prefill is bandwidth- or launch-bound,
    wasteful for long prompts, where grouped GEMMs over tokens sorted by expert belong (kernels/gemm.py).
    """
    w = weights.float()
    out = torch.zeros(x.shape[0], down.out_features, dtype=torch.float32, device=x.device)  # [T, H]
    for e in range(gate_up.num_experts):
        picked = expert_ids == e  # [T, k]
        we = torch.where(picked, w, 0).sum(-1, keepdim=True)  # [T, 1]: e's routing weight, 0 where not picked
        gate, up = gate_up.forward(x, None, e).chunk(2, dim=-1)  # [T, I] each, model dtype
        y = down.forward(F.silu(gate) * up, None, e)  # [T, H], model dtype
        out += torch.where(picked.any(-1, keepdim=True), y.float() * we, 0)  # not 0 * y: an unpicked token's y may be inf
    return out
