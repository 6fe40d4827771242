"""A quantized weight as a compute object: x @ W.T (+ bias) for an int8 / int4 W [N, K], or a stack of E.

Modes (which kernel runs it; `choose_mode` picks one from the kernel asked for, `kernel=`):
  "int8"     kernels/cpu.c on int8 rows with a scale per row; torch._weight_int8pack_mm for a few tokens.
  "packed4"  kernels/cpu.c on int4 in compressed-tensors int32 words (value + 8, low bits first), float32
             scales and uint8 zero points (+ 8) per group. Only where the extension runs and the shape fits it.
  "int4"     torch._weight_int4pack_mm_for_cpu on torch's own packing (opaque: never dequantised).
  "dequant"  the stored integers (int8, or two int4 per byte); each call dequantises the picked weight.
Kernels asked for: "native" (default: int8 / packed4 where they fit, else as "torch"), "torch" (int8 /
int4), "dequant". A float32 model always dequantises: torch's int kernels have no fast float32 path.
Many-token calls (gemm.MANY_TOKENS) dequantise and run one GEMM in gemm_dtype, like the float model
(int4 weights keep only torch's opaque packing, so they stay on the int4 kernel).
Dimension letters: E experts, N output features, K input features, G groups, T tokens.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moge_kernels import native
from moge_kernels.gemm import MANY_TOKENS, gemm_dtype

KERNELS = ("native", "torch", "dequant")
INT4_GROUPS = (32, 64, 128, 256)  # group sizes torch's CPU int4 kernel takes

Parts = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # q int8 [N, K], scale [N, G], zero int8 [N, G] or None


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """(q - zero) * scale in the scale's dtype, [..., N, K], as compressed-tensors computes it."""
    *lead, n, k = q.shape
    g = scale.shape[-1]
    x = q.reshape(*lead, n, g, k // g).to(scale.dtype)
    if zero is not None:
        x = x - zero.to(scale.dtype).unsqueeze(-1)
    return (x * scale.unsqueeze(-1)).reshape(*lead, n, k)


def choose_mode(bits: int, symmetric: bool, n: int, k: int, groups: int, dtype: torch.dtype, kernel: str) -> str:
    """The mode a weight [N, K] of `bits` in `groups` groups per row runs in, for a `dtype` model."""
    if kernel not in KERNELS:
        raise ValueError(f"quantized kernel {kernel!r}: use one of {', '.join(KERNELS)}")
    if kernel == "dequant" or dtype not in (torch.bfloat16, torch.float16):
        return "dequant"
    if bits == 8 and symmetric and groups == 1:
        return "int8"
    group = k // groups
    if kernel == "native" and native.available() and bits == 4 and k % 64 == 0 and (group == 32 or group % 64 == 0):
        return "packed4"
    if bits == 4 and group in INT4_GROUPS and n % 16 == 0 and k % 2 == 0:
        return "int4"
    return "dequant"


class QLinear(nn.Module):
    """x @ W.T (+ bias) for a quantized W [N, K], or a stack of E of them (pick one with `e`).

    Built from parts (q, scale, zero) per expert, each [N, K] / [N, G] / [N, G]; `mode` (choose_mode)
    says which kernel runs it. `empty(shape, dtype)` allocates the stacks the decode kernels stream
    (the loader passes one that asks for 2 MB pages).
    """

    def __init__(self, parts: list[Parts], bits: int, symmetric: bool, dtype: torch.dtype, kernel: str, empty: Callable | None = None):
        super().__init__()
        q0, s0, _ = parts[0]
        self.out_features, self.in_features = q0.shape
        self.groups = s0.shape[1]
        self.bits, self.dtype = bits, dtype
        self.mode = choose_mode(bits, symmetric, self.out_features, self.in_features, self.groups, dtype, kernel)

        def stack(ts: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(ts) if empty is None else torch.stack(ts, out=empty((len(ts), *ts[0].shape), ts[0].dtype))

        if self.mode == "int8":  # q [E, N, K] int8, scale [E, N]
            w = stack([q for q, _, _ in parts])
            scales = torch.stack([s[:, 0] for _, s, _ in parts]).to(dtype)
        elif self.mode == "packed4":  # words [E, N, K/8] int32 (little-endian nibbles: as compressed-tensors packs), scale [E, N, G] float32, zero + 8 [E, N, G] uint8
            w = stack([_nibbles(q).view(torch.int32) for q, _, _ in parts])
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
            raise ValueError("QLinear: weights in torch's int4 packing cannot be dequantised")
        if self.mode == "packed4":
            if self.dtype == torch.bfloat16 and (w := native.dequant(self._w[e], self._s[e], self._z[e], dtype)) is not None:
                return w  # kernels/dot.c: the same numbers, ~10x faster than the torch ops below
            q = _from_nibbles(self.weight[e].view(torch.uint8))
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
