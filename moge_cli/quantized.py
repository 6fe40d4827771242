"""Quantized (compressed-tensors pack-quantized) checkpoints at run time: weight-only int matmuls.

moge_cli.loader.load_quantized builds the usual model and puts a QLinear wherever a quantized weight
was: attention (through model._linear), lm_head, the routed experts ([E, N, K] stacks, one expert
picked per call), the shared expert and dense MLPs (QMoE / QDenseMLP). Embeddings, and any weight
whose parts mix schemes, are dequantised once at load.

QLinear kernels (`kernel=`), for a bfloat16 / float16 model:
  "native"   (default) the stored integers as kernels/cpu.c reads them: int8 rows with a scale per
             row (mode "int8"), int4 in the checkpoint's own int32 words with float32 scales and
             uint8 zero points per group (mode "packed4"). One-token calls, and whole decode steps
             (moge_cli/decode_step.py), run there on that pool's threads. Where the extension is
             missing, or an int4 shape does not fit it, as "torch".
  "torch"    torch's CPU weight-only kernels, converted once at load: int8 per channel ->
             torch._weight_int8pack_mm; int4 groups -> torch._weight_int4pack_mm_for_cpu.
  "dequant"  the stored integers are kept; each call dequantises the picked weight to float32.
bench/bench_quantize.py measures all three.
A float32 model always uses "dequant": torch's int kernels have no fast float32 path on CPU.
Many-token calls (prefill) dequantise and run one GEMM in model.gemm_dtype, like the float model
(int4 "torch" weights keep only torch's opaque packing, so they stay on the int4 kernel).
Dimension letters: E experts, N output features, K input features, G groups, T tokens, k picks.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from moge_kernels import native
from moge_kernels.routing import route
from moge_kernels.experts import combine_f32
from moge_cli import hugepages
from moge_cli.errors import CheckpointError, UsageError
from moge_cli.files import optional_file
from moge_cli.instrument import routing as record_routing
from moge_cli.instrument import section
from moge_cli.model import gemm_dtype
from moge_cli.quant_format import QuantizedCheckpoint, Scheme, read_quantization

KERNELS = ("native", "torch", "dequant")
DEFAULT_KERNEL = os.environ.get("MOGE_QUANT_KERNEL", "native")
MANY_TOKENS = 16  # from this many rows, a call dequantises and runs one GEMM (model.UPCAST_MIN_TOKENS, model.gemm_dtype)
INT4_GROUPS = (32, 64, 128, 256)  # group sizes torch's CPU int4 kernel takes
LINEAR_PARAMS = ("qkv_weight", "o_weight", "lm_head", "gate_up", "down", "shared_w13", "shared_w2", "w13", "w2")


# ---- the stored integers -------------------------------------------------------------------------
def unpack_rows(packed: torch.Tensor, bits: int, n: int, k: int, dim: int = 1) -> torch.Tensor:
    """compressed-tensors int32 words -> signed int8 [n, k] (dim=0: packed along rows, as zero points are)."""
    from moge_cli.quant_format import unpack_int32

    return unpack_int32(packed, bits, (n, k), dim)


def read_module(ckpt, module: str, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q int8 [N, K], scale [N, G], zero int8 [N, G] or None) of a stored module."""
    n, k = (int(v) for v in ckpt.tensor(f"{module}.weight_shape").tolist())
    q = unpack_rows(ckpt.tensor(f"{module}.weight_packed"), scheme.bits, n, k)
    scale = ckpt.tensor(f"{module}.weight_scale").clone()
    if scale.shape[0] != n or k % scale.shape[1]:
        raise CheckpointError(f"{module}.weight_scale: shape {list(scale.shape)} does not fit weight_shape {[n, k]}")
    zero = None
    if not scheme.symmetric:
        zero = unpack_rows(ckpt.tensor(f"{module}.weight_zero_point"), scheme.bits, n, scale.shape[1], dim=0)
    return q, scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """(q - zero) * scale in the scale's dtype, [..., N, K], as compressed-tensors computes it."""
    *lead, n, k = q.shape
    g = scale.shape[-1]
    x = q.reshape(*lead, n, g, k // g).to(scale.dtype)
    if zero is not None:
        x = x - zero.to(scale.dtype).unsqueeze(-1)
    return (x * scale.unsqueeze(-1)).reshape(*lead, n, k)


# ---- the matmul --------------------------------------------------------------------------------
class QLinear(nn.Module):
    """x @ W.T (+ bias) for a quantized W [N, K], or a stack of E of them (pick one with `e`).

    Built from parts (q, scale, zero) per expert, each [N, K] / [N, G] / [N, G]; `mode` says which
    kernel runs it: "int8" / "int4" (torch's kernels) or "dequant".
    """

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], scheme: Scheme, dtype: torch.dtype, kernel: str):
        super().__init__()
        q0, s0, _ = parts[0]
        self.out_features, self.in_features = q0.shape
        self.groups = s0.shape[1]
        self.bits, self.dtype = scheme.bits, dtype
        self.mode = _mode(scheme, self.out_features, self.in_features, self.groups, dtype, kernel)
        if self.mode == "int8":  # q [E, N, K] int8, scale [E, N]
            w = _stack([q for q, _, _ in parts])
            scales = torch.stack([s[:, 0] for _, s, _ in parts]).to(dtype)
        elif self.mode == "packed4":  # compressed-tensors words [E, N, K/8] int32, scale [E, N, G] float32, zero + 8 [E, N, G] uint8
            from moge_cli.quant_format import pack_int32

            w = _stack([pack_int32(q, 4) for q, _, _ in parts])
            scales = torch.stack([s.float() for _, s, _ in parts])
            zeros = [torch.zeros_like(s, dtype=torch.int8) if z is None else z for _, s, z in parts]  # symmetric: 0
            self.zeros = nn.Parameter(torch.stack([z.to(torch.uint8) + 8 for z in zeros]), requires_grad=False)
        elif self.mode == "int4":  # torch's packing [E, N, K/2], scales and zeros [E, G, N, 2]
            w = torch.stack([torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32) + 8, 1) for q, _, _ in parts])
            scales = torch.stack([_scales_and_zeros(s, z) for _, s, z in parts]).to(dtype)
        else:  # the stored integers: int8 [E, N, K], or two int4 per byte [E, N, K/2]; scale [E, N, G]
            w = torch.stack([_nibbles(q) if self.bits == 4 else q for q, _, _ in parts])
            scales = torch.stack([s for _, s, _ in parts])
            if parts[0][2] is not None:
                self.zeros = nn.Parameter(torch.stack([z for _, _, z in parts]), requires_grad=False)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.group_size = self.in_features // self.groups
        # Per-expert views, made once: indexing a stack costs more than the small matmuls it feeds.
        self._w, self._s = list(self.weight.unbind(0)), list(self.scales.unbind(0))
        self._z = list(self.zeros.unbind(0)) if self.mode == "packed4" else [None] * self.num_experts

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, N={self.out_features}, K={self.in_features}, int{self.bits}, groups={self.groups}, mode={self.mode}"

    def dequantized(self, e: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Weight e as [N, K] in dtype (not for mode int4: torch's packing is opaque)."""
        if self.mode == "int8":
            if (w := native.dequant(self._w[e], self._s[e], None, dtype)) is not None:
                return w  # kernels/dot.c: the same numbers in one pass
            return self.weight[e].to(dtype) * self.scales[e].to(dtype).unsqueeze(-1)
        if self.mode == "int4":
            raise UsageError("QLinear: weights in torch's int4 packing cannot be dequantised")
        if self.mode == "packed4":
            if self.dtype == torch.bfloat16 and (w := native.dequant(self._w[e], self._s[e], self._z[e], dtype)) is not None:
                return w  # kernels/dot.c: the same numbers, ~10x faster than the torch ops below
            q = unpack_rows(self.weight[e], 4, self.out_features, self.in_features)
            return dequantize(q, self.scales[e].to(self.dtype), self.zeros[e].to(torch.int8) - 8).to(dtype)
        q = self.weight[e] if self.bits == 8 else _from_nibbles(self.weight[e])
        zero = self.zeros[e] if hasattr(self, "zeros") else None
        return dequantize(q, self.scales[e], zero).to(dtype)

    def native_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(weight, scale, zero) stacks as kernels/cpu.c reads them (native.weight_args), or None for torch's packings."""
        if self.mode == "int8":
            return self.weight, self.scales, None
        return (self.weight, self.scales, self.zeros) if self.mode == "packed4" else None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, e: int = 0) -> torch.Tensor:
        shape = x.shape
        if self.mode in ("int8", "packed4") and x.numel() == self.in_features and (y := native.linear_vec(x, self._w[e], bias, self._s[e], self._z[e])) is not None:
            return y  # one token: kernels/cpu.c on the stored integers
        if self.mode in ("int8", "int4") and x.dtype == self.dtype and x.numel() < MANY_TOKENS * self.in_features:  # decode
            x2 = x if x.dim() == 2 else x.view(-1, self.in_features)
            if self.mode == "int8":
                y = torch._weight_int8pack_mm(x2, self._w[e], self._s[e])
            else:
                y = torch._weight_int4pack_mm_for_cpu(x2, self._w[e], self.group_size, self._s[e])
            if bias is not None:
                y += bias
            return y if x.dim() == 2 else y.view(*shape[:-1], self.out_features)
        x2 = x.reshape(-1, shape[-1])  # [T, K]
        if self.mode == "int4":
            y = torch._weight_int4pack_mm_for_cpu(x2.to(self.dtype), self._w[e], self.group_size, self._s[e])
        elif self.mode == "int8" and x2.shape[0] < MANY_TOKENS:
            y = torch._weight_int8pack_mm(x2.to(self.dtype), self._w[e], self._s[e])
        else:  # dequantise this weight, one GEMM (float32, or bfloat16 where the CPU runs those natively)
            g = gemm_dtype(self.dtype)
            y = F.linear(x2.to(g), self.dequantized(e, g))
        if bias is not None:
            y = y + bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def _stack(ts: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack into memory in 2 MB pages where it can be (moge_cli.hugepages): the decode kernels stream it."""
    return torch.stack(ts, out=hugepages.empty((len(ts), *ts[0].shape), ts[0].dtype))


def _mode(scheme: Scheme, n: int, k: int, groups: int, dtype: torch.dtype, kernel: str) -> str:
    if kernel not in KERNELS:
        raise UsageError(f"quantized kernel {kernel!r}: use one of {', '.join(KERNELS)}")
    if kernel == "dequant" or dtype not in (torch.bfloat16, torch.float16):
        return "dequant"
    if scheme.bits == 8 and scheme.symmetric and groups == 1:
        return "int8"
    group = k // groups
    if kernel == "native" and native.available() and scheme.bits == 4 and k % 64 == 0 and (group == 32 or group % 64 == 0):
        return "packed4"
    if scheme.bits == 4 and group in INT4_GROUPS and n % 16 == 0 and k % 2 == 0:
        return "int4"
    return "dequant"


def _scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """torch's int4 kernel computes (u - 8) * s + m for u = q + 8, so m = -zero * s: [G, N, 2] float32."""
    s = scale.float()
    m = torch.zeros_like(s) if zero is None else -zero.float() * s
    return torch.stack([s.t(), m.t()], dim=-1).contiguous()


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """int4 values [N, K] (int8, -8..7) -> [N, K/2] uint8, column 2j in the low half of byte j."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[1] % 2:
        u = F.pad(u, (0, 1))
    return u[:, 0::2] | (u[:, 1::2] << 4)


def _from_nibbles(p: torch.Tensor) -> torch.Tensor:
    n = p.shape[0]
    u = torch.stack([p & 15, p >> 4], dim=-1).reshape(n, -1)
    return u.to(torch.int8) - 8


def mm(x: torch.Tensor, w, e: int | None = None) -> torch.Tensor:
    """x @ w.T for a QLinear w (expert e of it) or a plain weight [N, K] / stack [E, N, K]."""
    if isinstance(w, QLinear):
        return w.forward(x, None, e or 0)  # not w(...): nn.Module's call machinery costs more than a decode matmul
    w = w if e is None else w[e]
    if x.shape[0] >= MANY_TOKENS and (g := gemm_dtype(x.dtype)) != x.dtype:
        return F.linear(x.to(g), w.to(g)).to(x.dtype)
    return F.linear(x, w)


def swiglu(x: torch.Tensor, w13, w2, e: int | None = None) -> torch.Tensor:
    """One SwiGLU MLP (expert e of a stack): w2 @ (silu(gate x) * up x); w13 rows: gate, then up."""
    gate, up = mm(x, w13, e).chunk(2, dim=-1)
    return mm(F.silu(gate) * up, w2, e)


# ---- quantized MoE / dense MLP ------------------------------------------------------------------
class QMoE(nn.Module):
    """model.MoE with quantized (or plain) expert and shared-expert weights; same routing and sums.

    Not constructed: load_quantized turns a loaded MoE into one (the parameters are the same, some
    of them QLinear), so this class only brings the forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, H]
        with section("router"):
            logits = F.linear(x.float(), self.gate)  # [T, E]
            expert_ids, weights = route(logits, self.n_groups, self.picks, self.router_scale)  # [T, k] each
        record_routing(self.layer, logits, expert_ids)
        with section("routed_experts"):
            y = routed_experts(x, expert_ids, weights, self.gate_up, self.down)
        if self.shared_w13 is not None:
            with section("shared_expert"):
                shared = native_moe(x, native.ONE_ID, native.ONE_WEIGHT, self.shared_w13, self.shared_w2, shared=True) if x.shape[0] == 1 else None
                y = y + (shared if shared is not None else swiglu(x, self.shared_w13, self.shared_w2).float())
        return y.to(x.dtype)


class QDenseMLP(nn.Module):
    """model.DenseMLP with quantized weights (turned into from a loaded DenseMLP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with section("dense_mlp"):
            return swiglu(x, self.w13, self.w2)


def routed_experts(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate_up, down) -> torch.Tensor:
    """sum over a token's k picks of weight * expert(x): x [T, H] -> float32 [T, H].

    The (token, slot) pairs are grouped by expert (a dict for a few pairs, a stable sort for many);
    each picked expert runs once on its rows; results go back to pair order and are summed in float32.
    """
    T, k = expert_ids.shape
    if T == 1 and (y := native_moe(x, expert_ids, weights, gate_up, down)) is not None:
        return y
    if T == 1:  # decode: k different experts on one token, no grouping needed
        ys = torch.cat([swiglu(x, gate_up, down, e) for e in expert_ids[0].tolist()])  # [k, H]
        return torch.mm(weights.float(), ys.float())  # [1, k] @ [k, H]: the weighted sum, in float32
    flat = expert_ids.reshape(-1)
    if flat.numel() <= 64:
        groups: dict[int, list[int]] = {}
        for p, e in enumerate(flat.tolist()):
            groups.setdefault(e, []).append(p)
        runs = [(e, torch.tensor(ps)) for e, ps in sorted(groups.items())]
    else:
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=gate_up.shape[0] if not isinstance(gate_up, QLinear) else gate_up.num_experts).tolist()
        runs, start = [], 0
        for e, c in enumerate(counts):
            if c:
                runs.append((e, order[start : start + c]))
                start += c
    y = torch.empty(T * k, x.shape[1], dtype=x.dtype)  # [P, H] in (token, slot) order
    for e, pairs in runs:
        xe = x[pairs // k] if len(pairs) > 1 else x[int(pairs[0]) // k].unsqueeze(0)
        y[pairs] = swiglu(xe, gate_up, down, e)
    return combine_f32(y.view(T, k, -1), weights)


def native_moe(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate_up, down, shared: bool = False) -> torch.Tensor | None:
    """kernels/cpu.c's one-token experts (float32 [1, H]) for int8 QLinear stacks or plain weights; None otherwise.

    shared=True: gate_up / down are one MLP ([2I, H] / [H, I], or QLinears of one expert).
    """
    if isinstance(gate_up, QLinear) and isinstance(down, QLinear):
        gu, dn = gate_up.native_weight(), down.native_weight()
        if gu is None or dn is None:
            return None
        return native.moe_vec(x, expert_ids, weights, gu[0], dn[0], gu[1], dn[1], gu[2], dn[2])
    if isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor):
        return native.moe_vec(x, expert_ids, weights, *((gate_up.unsqueeze(0), down.unsqueeze(0)) if shared else (gate_up, down)))
    return None


def runs_natively(model) -> bool:
    """Every quantized weight is one kernels/cpu.c reads: the model's decode runs there, not on torch's int kernels."""
    return all(q.native_weight() is not None for q in model.modules() if isinstance(q, QLinear))


# ---- which checkpoints are quantized ------------------------------------------------------------
def quantization_of(ckpt) -> QuantizedCheckpoint | None:
    """The checkpoint's quantization (read from config.json and the tensor names), or None."""
    path = optional_file(ckpt.root, "config.json")  # checked by moge_cli.files when the checkpoint opened; again, as read
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path is not None else dict(ckpt.config.extra)
    except (OSError, ValueError):
        config = dict(ckpt.config.extra)
    return read_quantization(config, {n: i.shape for n, i in ckpt.tensors.items()})
