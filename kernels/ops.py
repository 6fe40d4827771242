"""The compute entry: every op of the model, for float weights (tensors) and quantized ones (QLinear).

Which path runs is chosen here and nowhere else: kernels/cpu.c for one token where it can
(native.*_vec), torch's int kernels or a dequantised GEMM for quantized weights (QLinear.forward),
float32 copies for many low-precision tokens (gemm.upcast), plain torch otherwise; off the CPU the routed
experts read nothing back to the host (experts.moe_experts chooses). The whole decode step
(kernels/step.c) is planned by decode_step.py.
Shapes: T tokens, H hidden, E experts, k picks per token, I expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moge_kernels import native
from moge_kernels.attention import attention
from moge_kernels.experts import by_expert, combine_f32, dense_mlp, moe_experts
from moge_kernels.gemm import MANY_TOKENS, gemm_dtype, upcast
from moge_kernels.qexperts import moe_device
from moge_kernels.qlinear import QLinear
from moge_kernels.routing import route

__all__ = ["linear", "rms_norm", "attention", "route", "moe", "shared_mlp", "mlp", "swiglu", "gemm_dtype", "MANY_TOKENS"]

Weight = "torch.Tensor | QLinear"


def linear(x: torch.Tensor, w: Weight, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ b) in x's dtype. One token runs kernels/cpu.c's kernel where it can; for many
    low-precision tokens the matmul runs on float32 copies (gemm.MANY_TOKENS); a QLinear picks its own."""
    if type(w) is QLinear:
        return w.forward(x, b)
    if x.numel() == x.shape[-1] and (y := native.linear_vec(x, w, b)) is not None:
        return y
    if gemm_dtype(x.dtype) == x.dtype or x.device.type != "cpu" or x.numel() < MANY_TOKENS * x.shape[-1]:
        return F.linear(x, w, b)
    return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight in float32, returned in x's dtype."""
    if x.numel() == x.shape[-1] and (y := native.rms_norm_vec(x, weight, eps)) is not None:  # one token: kernels/cpu.c
        return y
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


def moe(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate_up: Weight, down: Weight) -> torch.Tensor:
    """Routed experts: sum over a token's k picks of weight * expert(x). x [T, H], expert_ids and weights [T, k],
    gate_up [E, 2I, H] / down [E, H, I] stacks (or QLinears of E experts). Returns [T, H]: float stacks in the
    dtype they ran in (x's, or float32: gemm.upcast), quantized ones in float32. Add shared_mlp, then cast."""
    if type(gate_up) is QLinear or type(down) is QLinear:
        return _quantized_experts(x, expert_ids, weights, gate_up, down)
    if upcast(x):
        return moe_experts(x.float(), expert_ids, weights, gate_up.float(), down.float())
    return moe_experts(x, expert_ids, weights, gate_up, down)


def shared_mlp(x: torch.Tensor, w13: Weight, w2: Weight) -> torch.Tensor:
    """The shared expert, [T, H] in the dtype moe's result has for the same weights (to add to it)."""
    if type(w13) is QLinear or type(w2) is QLinear:
        if x.shape[0] == 1 and (y := _native_experts(x, native.ONE_ID, native.ONE_WEIGHT, w13, w2, shared=True)) is not None:
            return y
        return swiglu(x, w13, w2).float()
    if upcast(x):
        return dense_mlp(x.float(), w13.float(), w2.float())
    return dense_mlp(x, w13, w2)


def mlp(x: torch.Tensor, w13: Weight, w2: Weight) -> torch.Tensor:
    """A dense SwiGLU MLP (w13 [2I, H] gate rows then up, w2 [H, I]): [T, H] in x's dtype."""
    if type(w13) is QLinear or type(w2) is QLinear:
        return swiglu(x, w13, w2)
    if upcast(x):
        return dense_mlp(x.float(), w13.float(), w2.float()).to(x.dtype)
    return dense_mlp(x, w13, w2)


def mm(x: torch.Tensor, w: Weight, e: int | None = None) -> torch.Tensor:
    """x @ w.T for a QLinear w (expert e of it) or a plain weight [N, K] / stack [E, N, K]."""
    if type(w) is QLinear:
        return w.forward(x, None, e or 0)  # not w(...): nn.Module's call machinery costs more than a decode matmul
    w = w if e is None else w[e]
    if x.shape[0] >= MANY_TOKENS and (g := gemm_dtype(x.dtype)) != x.dtype:
        return F.linear(x.to(g), w.to(g)).to(x.dtype)
    return F.linear(x, w)


def swiglu(x: torch.Tensor, w13: Weight, w2: Weight, e: int | None = None) -> torch.Tensor:
    """One SwiGLU MLP (expert e of a stack), one matmul at a time: w2 @ (silu(gate x) * up x); w13 rows: gate, then up."""
    gate, up = mm(x, w13, e).chunk(2, dim=-1)
    return mm(F.silu(gate) * up, w2, e)


def _quantized_experts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate_up: Weight, down: Weight) -> torch.Tensor:
    """moe for QLinear stacks: float32 [T, H].

    Each picked expert runs once on its rows (experts.by_expert, as for float stacks); the results are
    summed in float32.
    """
    T, k = expert_ids.shape
    E = gate_up.num_experts if type(gate_up) is QLinear else gate_up.shape[0]
    if x.device.type != "cpu" and T * k <= E and type(gate_up) is QLinear and type(down) is QLinear:
        return moe_device(x, expert_ids, weights, gate_up, down)  # decode off the CPU: reads nothing back (CUDA graphs)
    if T == 1 and (y := _native_experts(x, expert_ids, weights, gate_up, down)) is not None:
        return y
    if T == 1:  # decode: k different experts on one token, no grouping needed
        ys = torch.cat([swiglu(x, gate_up, down, e) for e in expert_ids[0].tolist()])  # [k, H]
        return torch.mm(weights.float(), ys.float())  # [1, k] @ [k, H]: the weighted sum, in float32
    y = by_expert(x, expert_ids, E, lambda xe, e: swiglu(xe, gate_up, down, e))  # [P, H] in (token, slot) order
    return combine_f32(y.view(T, k, -1), weights)


def _native_experts(x, expert_ids, weights, gate_up: Weight, down: Weight, shared: bool = False) -> torch.Tensor | None:
    """kernels/cpu.c's one-token experts (float32 [1, H]) for int8 / packed4 QLinear stacks or plain weights; None otherwise.

    shared=True: gate_up / down are one MLP ([2I, H] / [H, I], or QLinears of one expert).
    """
    if type(gate_up) is QLinear and type(down) is QLinear:
        gu, dn = gate_up.native_weight(), down.native_weight()
        if gu is None or dn is None:
            return None
        return native.moe_vec(x, expert_ids, weights, gu[0], dn[0], gu[1], dn[1], gu[2], dn[2])
    if isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor):
        return native.moe_vec(x, expert_ids, weights, *((gate_up.unsqueeze(0), down.unsqueeze(0)) if shared else (gate_up, down)))
    return None


def runs_natively(model: torch.nn.Module) -> bool:
    """Every quantized weight is one kernels/cpu.c reads: the model's decode runs there, not on torch's int kernels."""
    return all(q.native_weight() is not None for q in model.modules() if type(q) is QLinear)
