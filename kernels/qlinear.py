"""A quantized weight as a compute object: x @ W.T (+ bias) for an int8 / int4 W [N, K], or a stack of E.

Modes (which kernel runs it; `choose_mode` picks one from the kernel asked for, `kernel=`):
  "int8"     kernels/cpu.c on int8 rows with a scale per row; torch._weight_int8pack_mm for a few tokens.
  "packed4"  kernels/cpu.c on int4 in compressed-tensors int32 words (value + 8, low bits first), float32
             scales and uint8 zero points (+ 8) per group. Only where the extension runs and the shape fits it.
  "int4"     torch._weight_int4pack_mm_for_cpu on torch's own packing (opaque: never dequantised).
  "dequant"  the stored integers (int8, or two int4 per byte); each call dequantises the picked weight.
On a CUDA device (`device=`; see "on CUDA" in docs/quantization.md):
  "cuda_int8"  int8 rows [N, K] with the model-dtype scale per row: torch._weight_int8pack_mm (CUDA since torch 2.9).
  "cuda_int4"  torch's tinygemm packing (_convert_weight_to_int4pack: int32 [N/8, K/(16 i), 32, i/2] for i inner
               k-tiles) with bfloat16 scales and zeros [G, N, 2]: torch._weight_int4pack_mm (sm80+, bfloat16 only).
               Unlike the CPU int4 packing it can be unpacked (_tinygemm_unpack: a fixed permutation), so these
               weights dequantise too (prefill, kernels/qexperts.py).
  Where a weight does not fit them it runs "dequant" on the device; `why` (shown by extra_repr) says what did not fit.
Kernels asked for: "native" (default: int8 / packed4 where they fit, else as "torch"), "torch" (int8 /
int4), "dequant". On the CPU a float32 model always dequantises: torch's int kernels have no fast float32 path.
Many-token calls (gemm.MANY_TOKENS) dequantise and run one GEMM in gemm_dtype, like the float model
(int4 weights keep only torch's opaque packing, so they stay on the int4 kernel).
Dimension letters: E experts, N output features, K input features, G groups, T tokens, P picked experts.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moge_kernels import native
from moge_kernels.gemm import MANY_TOKENS, gemm_dtype

KERNELS = ("native", "torch", "dequant")
INT4_GROUPS = (32, 64, 128, 256)  # group sizes torch's int4 kernels take (CPU and CUDA)
MODES = ("int8", "packed4", "int4", "dequant", "cuda_int8", "cuda_int4")
INNER_K_TILES = (8, 4, 2)  # tinygemm packs i k-tiles of 16 per lane load; the largest i with K % (16 i) == 0 is used

Parts = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # q int8 [N, K], scale [N, G], zero int8 [N, G] or None


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """(q - zero) * scale in the scale's dtype, [..., N, K], as compressed-tensors computes it."""
    *lead, n, k = q.shape
    g = scale.shape[-1]
    x = q.reshape(*lead, n, g, k // g).to(scale.dtype)
    if zero is not None:
        x = x - zero.to(scale.dtype).unsqueeze(-1)
    return (x * scale.unsqueeze(-1)).reshape(*lead, n, k)


def choose_mode(bits: int, symmetric: bool, n: int, k: int, groups: int, dtype: torch.dtype, kernel: str, device="cpu") -> str:
    """The mode a weight [N, K] of `bits` in `groups` groups per row runs in, for a `dtype` model on `device`."""
    return mode_and_reason(bits, symmetric, n, k, groups, dtype, kernel, device)[0]


def mode_and_reason(bits: int, symmetric: bool, n: int, k: int, groups: int, dtype: torch.dtype, kernel: str, device="cpu") -> tuple[str, str]:
    """(choose_mode's mode, why): why says what did not fit where a device's integer kernel was passed over ('' otherwise)."""
    if kernel not in KERNELS:
        raise ValueError(f"quantized kernel {kernel!r}: use one of {', '.join(KERNELS)}")
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_mode(bits, symmetric, n, k, groups, dtype, kernel, device)
    if device.type != "cpu":
        return "dequant", f"no integer kernel on {device.type}"
    return _cpu_mode(bits, symmetric, n, k, groups, dtype, kernel), ""


def _cpu_mode(bits: int, symmetric: bool, n: int, k: int, groups: int, dtype: torch.dtype, kernel: str) -> str:
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


def _cuda_mode(bits: int, symmetric: bool, n: int, k: int, groups: int, dtype: torch.dtype, kernel: str, device: torch.device) -> tuple[str, str]:
    """torch's CUDA weight-only kernels where the weight fits them (checks: aten/src/ATen/native/cuda/int8mm.cu, int4mm.cu)."""
    if kernel == "dequant":
        return "dequant", "kernel dequant asked for"
    if bits == 8:
        if not symmetric or groups != 1:
            return "dequant", "int8 with zero points or groups: _weight_int8pack_mm takes one scale per row"
        if not _has_cuda_kernel("_weight_int8pack_mm"):
            return "dequant", f"torch {torch.__version__} has no CUDA _weight_int8pack_mm (torch >= 2.9)"
        return "cuda_int8", ""
    group = k // groups
    if dtype != torch.bfloat16:
        return "dequant", f"_weight_int4pack_mm on CUDA runs bfloat16 only, the model is {str(dtype).removeprefix('torch.')}"
    if group not in INT4_GROUPS:
        return "dequant", f"group size {group}: _weight_int4pack_mm takes {', '.join(map(str, INT4_GROUPS))}"
    if n % 8:  # (K is groups * group, so a multiple of 32: the 2 inner k-tiles of 16 the packing needs at least)
        return "dequant", f"N = {n}: _weight_int4pack_mm needs N % 8 == 0"
    if not _has_cuda_kernel("_weight_int4pack_mm") or _torch_version() < (2, 5):
        return "dequant", f"torch {torch.__version__}: no CUDA _weight_int4pack_mm taking uint8 [N, K/2] (torch >= 2.5)"
    if _capability(device) < (8, 0):
        return "dequant", "_weight_int4pack_mm needs compute capability 8.0 or newer"
    return "cuda_int4", ""


@functools.cache
def _has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "CUDA")


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if torch.cuda.is_available() else (0, 0)


def qlinear_nbytes(mode: str, bits: int, symmetric: bool, n: int, k: int, groups: int, dtype: torch.dtype, experts: int = 1, scale_dtype: torch.dtype | None = None) -> int:
    """The bytes a QLinear of `experts` weights [N, K] in `mode` holds on its device (= QLinear.nbytes, from shapes
    only: for memory plans). scale_dtype: the checkpoint's scale dtype (kept as is by "dequant"; default dtype)."""
    db, sb = dtype.itemsize, (scale_dtype or dtype).itemsize
    if mode in ("int8", "cuda_int8"):  # int8 [N, K], scale [N] in the model dtype
        one = n * k + n * db
    elif mode == "packed4":  # int32 words [N, K/8], float32 scales and uint8 zeros [N, G]
        one = n * k // 2 + n * groups * 5
    elif mode == "int4":  # torch's CPU packing [N, K/2] uint8, scales and zeros [G, N, 2] in the model dtype
        one = n * k // 2 + groups * n * 2 * db
    elif mode == "cuda_int4":  # tinygemm's int32 words (N padded to 8, K/8 per row), bfloat16 scales and zeros [G, N, 2]
        one = -(-n // 8) * 8 * k // 2 + groups * n * 2 * 2
    elif mode == "dequant":  # the stored integers (two int4 per byte), scales [N, G] as stored, int8 zeros when asymmetric
        one = n * (k if bits == 8 else (k + 1) // 2) + n * groups * sb + (0 if symmetric else n * groups)
    else:
        raise ValueError(f"QLinear mode {mode!r}: use one of {', '.join(MODES)}")
    return experts * one


class QLinear(nn.Module):
    """x @ W.T (+ bias) for a quantized W [N, K], or a stack of E of them (pick one with `e`).

    Built from parts (q, scale, zero) per expert, each [N, K] / [N, G] / [N, G] (CPU tensors, as read from the
    checkpoint); `mode` (choose_mode, for `device`) says which kernel runs it, and the stacks are repacked for it
    once, here, on `device`. `empty(shape, dtype)` allocates the CPU stacks the decode kernels stream (the loader
    passes one that asks for 2 MB pages). `mode=` forces a mode (tests build the CUDA layouts on the CPU: their
    repacking is tensor code, only the matmuls are CUDA's).
    """

    def __init__(
        self, parts: list[Parts], bits: int, symmetric: bool, dtype: torch.dtype, kernel: str, empty: Callable | None = None, device="cpu", mode: str | None = None
    ):
        super().__init__()
        q0, s0, _ = parts[0]
        self.out_features, self.in_features = q0.shape
        self.groups = s0.shape[1]
        self.bits, self.dtype = bits, dtype
        device = torch.device(device)
        if mode is not None and mode not in MODES:
            raise ValueError(f"QLinear mode {mode!r}: use one of {', '.join(MODES)}")
        self.mode, self.why = (mode, "mode given") if mode else mode_and_reason(bits, symmetric, self.out_features, self.in_features, self.groups, dtype, kernel, device)

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
        elif self.mode == "cuda_int8":  # q [E, N, K] int8, scale [E, N] in the model dtype (what _weight_int8pack_mm takes)
            w = _stacked(len(parts), lambda e: parts[e][0].to(device))
            scales = _stacked(len(parts), lambda e: parts[e][1][:, 0].to(device, dtype))
        elif self.mode == "cuda_int4":  # tinygemm's words [E, N/8, K/(16 i), 32, i/2] int32, scales and zeros [E, G, N, 2] bfloat16
            self.inner_k_tiles = next(i for i in INNER_K_TILES if self.in_features % (16 * i) == 0)
            w = _stacked(len(parts), lambda e: _int4pack(_tinygemm_bytes(parts[e][0]).to(device), self.inner_k_tiles))
            scales = _stacked(len(parts), lambda e: _scales_and_zeros(parts[e][1], parts[e][2]).to(device, torch.bfloat16))
        else:  # the stored integers: int8 [E, N, K], or two int4 per byte [E, N, K/2]; scale [E, N, G]
            if device.type == "cpu":
                w = torch.stack([_nibbles(q) if self.bits == 4 else q for q, _, _ in parts])
                scales = torch.stack([s for _, s, _ in parts])
            else:  # built on the device one expert at a time (no CPU copy of the stack)
                w = _stacked(len(parts), lambda e: (_nibbles(parts[e][0]) if self.bits == 4 else parts[e][0]).to(device))
                scales = _stacked(len(parts), lambda e: parts[e][1].to(device))
            if parts[0][2] is not None:
                self.zeros = nn.Parameter(_stacked(len(parts), lambda e: parts[e][2].to(device)), requires_grad=False)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.group_size = self.in_features // self.groups
        # Per-expert views, made once: indexing a stack costs more than the small matmuls it feeds.
        self._w, self._s = list(self.weight.unbind(0)), list(self.scales.unbind(0))
        self._z = list(self.zeros.unbind(0)) if self.mode == "packed4" else [None] * self.num_experts

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held on the device after repacking: integers, scales and zeros (= qlinear_nbytes for this mode)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    @property
    def dequantizable(self) -> bool:
        """Whether dequantized / dequantized_experts work: all modes but torch's opaque CPU int4 packing."""
        return self.mode != "int4"

    def extra_repr(self) -> str:
        why = f", why={self.why}" if self.why else ""
        return f"E={self.num_experts}, N={self.out_features}, K={self.in_features}, int{self.bits}, groups={self.groups}, mode={self.mode}{why}"

    def dequantized(self, e: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Weight e as [N, K] in dtype (not for mode int4: torch's CPU packing is opaque)."""
        if self.mode == "int8" and (w := native.dequant(self._w[e], self._s[e], None, dtype)) is not None:
            return w  # kernels/dot.c: the same numbers in one pass
        if self.mode == "packed4" and self.dtype == torch.bfloat16 and (w := native.dequant(self._w[e], self._s[e], self._z[e], dtype)) is not None:
            return w  # kernels/dot.c: the same numbers, ~10x faster than the torch ops below
        return self._dequantized(slice(e, e + 1), dtype)[0]

    def dequantized_experts(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Weights ids [P] (int64, on the weight's device) as [P, N, K] in dtype, without a host sync: reads only
        those experts' integers (a gather of P stored experts), then dequantises them."""
        return self._dequantized(ids, dtype)

    def _dequantized(self, sel: slice | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The experts `sel` (a slice or an index tensor) dequantised: [P, N, K] in dtype."""
        w = self.weight[sel]
        if self.mode in ("int8", "cuda_int8"):
            return w.to(dtype) * self.scales[sel].to(dtype).unsqueeze(-1)
        if self.mode == "int4":
            raise ValueError("QLinear: weights in torch's CPU int4 packing cannot be dequantised")
        if self.mode == "packed4":
            q = _from_nibbles(w.view(torch.uint8))
            return dequantize(q, self.scales[sel].to(self.dtype), self.zeros[sel].to(torch.int8) - 8).to(dtype)
        if self.mode == "cuda_int4":  # tinygemm computes (u - 8) * s + m in one rounding (bf16 fma); addcmul does too
            sz = self.scales[sel].transpose(1, 2).to(dtype).contiguous()  # [P, N, G, 2] (small)
            q = _tinygemm_unpack(w).view(torch.int8) - 8  # [P, N, K] int8 (addcmul reads it as dtype, exactly)
            p, n, k = q.shape
            y = torch.addcmul(sz[..., 1:], q.view(p, n, self.groups, k // self.groups), sz[..., :1])  # [P, N, G, K/G]
            return y.reshape(p, n, k)
        q = w if self.bits == 8 else _from_nibbles(w)
        zero = self.zeros[sel] if hasattr(self, "zeros") else None
        return dequantize(q, self.scales[sel], zero).to(dtype)

    def native_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(weight, scale, zero) stacks as kernels/cpu.c reads them (native.weight_args), or None for torch's packings."""
        if self.mode == "int8":
            return self.weight, self.scales, None
        return (self.weight, self.scales, self.zeros) if self.mode == "packed4" else None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, e: int = 0) -> torch.Tensor:
        shape = x.shape
        if self.mode in ("cuda_int8", "cuda_int4"):
            return self._cuda_forward(x, bias, e)
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
        else:  # dequantise this weight, one GEMM (CPU: float32, or bfloat16 where the CPU runs those natively; a device: the model dtype)
            g = gemm_dtype(self.dtype) if x.device.type == "cpu" else self.dtype
            y = F.linear(x2.to(g), self.dequantized(e, g))
        if bias is not None:
            y = y + bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _cuda_forward(self, x: torch.Tensor, bias: torch.Tensor | None, e: int) -> torch.Tensor:
        """Few tokens: torch's weight-only kernel on the repacked integers; MANY_TOKENS or more: this weight
        dequantised in the model dtype, one cuBLAS GEMM (both kernels are GEMV-shaped: they lose to it there).

        int8 under torch.compile: a multiply and a float32 sum over K, which inductor fuses into one reduction
        reading the int8 weight once. Not gpt-fast's F.linear(x, w.to(dtype)) * scale: inductor's weight-only
        pattern (torch/_inductor/fx_passes/quantization.py, valid on CUDA since pytorch#161680) rewrites that into
        _weight_int8pack_mm, whose CUDA kernel is, up to torch 2.13 at least, one thread per output walking a row
        (aten/src/ATen/native/cuda/int8mm.cu; pytorch#190529 rewrites it): far under the memory bandwidth, so
        eager int8 decode is correct and half bf16's bytes, but not fast."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()  # [T, K]: the kernels read x's memory as dense rows
        if x2.shape[0] >= MANY_TOKENS:
            y = F.linear(x2, self._dequantized(slice(e, e + 1), self.dtype)[0])
        elif self.mode == "cuda_int8" and torch.compiler.is_compiling():
            y = ((x2.unsqueeze(1) * self._w[e].to(self.dtype)).sum(-1, dtype=torch.float32) * self._s[e]).to(self.dtype)  # [T, N]
        elif self.mode == "cuda_int8":
            y = torch._weight_int8pack_mm(x2, self._w[e], self._s[e])
        else:
            y = torch._weight_int4pack_mm(x2, self._w[e], self.group_size, self._s[e])
        if bias is not None:
            y = y + bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)


def _stacked(n: int, make: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """torch.stack([make(i) for i in range(n)]) filled in place: besides the stack, one item at a time exists
    (repacking on a device holds one expert's temporaries, not E)."""
    first = make(0)
    out = torch.empty((n, *first.shape), dtype=first.dtype, device=first.device)
    out[0] = first
    for i in range(1, n):
        out[i] = make(i)
    return out


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
    """[..., N, K/2] uint8 (_nibbles' packing) -> int4 values [..., N, K] int8."""
    u = torch.stack([p & 15, p >> 4], dim=-1).reshape(*p.shape[:-1], -1)
    return u.to(torch.int8) - 8


# ---- torch's CUDA int4 packing (tinygemm: aten/src/ATen/native/cuda/int4mm.cu) ------------------------
# _convert_weight_to_int4pack takes u = q + 8 as uint8 [N, K/2], column 2j in the HIGH half of byte j (torch >= 2.5;
# gpt-fast and torchao write `w[:, ::2] << 4 | w[:, 1::2]`), and lays it out for mma.m16n8k16's B fragments:
# int32 [N/8, K/(16 i), 32, i/2] for i inner k-tiles. Word [nt, ko, t, w] holds, for row n = 8 nt + t // 4, the 8
# values at k = 16 i ko + 32 w + 16 vhi + 8 vlo + 2 (t % 4) + hsel, the value (hsel, vhi, vlo) in bits 4 (4 hsel +
# 2 vhi + vlo) up. So packing is a permutation of the [N, K] values: the two functions below, which the tests
# check against a line-by-line port of the CUDA packing kernel (and, on a GPU, against the op itself).
_TILE = ("nt", "n8", "ko", "w", "vhi", "vlo", "q4", "hsel")  # [N, K] split: n = 8 nt + n8, k as above (q4 = t % 4)
_WORD = ("nt", "ko", "n8", "q4", "w", "hsel", "vhi", "vlo")  # the packed order: [nt, ko, t = 4 n8 + q4, w, nibble]


def _tinygemm_bytes(q: torch.Tensor) -> torch.Tensor:
    """int4 values [N, K] (int8, -8..7) -> u = q + 8 as [N, K/2] uint8, column 2j in the high half of byte j."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return ((u[:, 0::2] << 4) | u[:, 1::2]).contiguous()


def _int4pack(u8: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """torch._convert_weight_to_int4pack on CUDA; elsewhere its tensor twin _tinygemm_pack (the same bits)."""
    if u8.device.type == "cuda":
        return torch._convert_weight_to_int4pack(u8, inner_k_tiles)
    return _tinygemm_pack(u8, inner_k_tiles)


def _tile_shape(n: int, k: int, inner_k_tiles: int) -> tuple[int, ...]:
    return (n // 8, 8, k // (16 * inner_k_tiles), inner_k_tiles // 2, 2, 2, 4, 2)  # sizes of _TILE


def _tinygemm_pack(u8: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """[N, K/2] uint8 (_tinygemm_bytes) -> tinygemm's int32 [N/8, K/(16 i), 32, i/2], as _convert_weight_to_int4pack."""
    n, k = u8.shape[0], 2 * u8.shape[1]
    u = torch.stack([u8 >> 4, u8 & 15], dim=-1).view(n, k).to(torch.int64)  # [N, K] values 0..15
    t = u.view(_tile_shape(n, k, inner_k_tiles)).permute(*(_TILE.index(d) for d in _WORD)).reshape(n // 8, -1, 32, inner_k_tiles // 2, 8)
    words = (t << torch.arange(0, 32, 4, device=u8.device)).sum(-1)  # [N/8, K/(16 i), 32, i/2] as uint32 values
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _tinygemm_unpack(words: torch.Tensor) -> torch.Tensor:
    """tinygemm's int32 [..., N/8, K/(16 i), 32, i/2] -> the values u [..., N, K] uint8 (0..15).

    On bytes, not int32 (a quarter of the temporaries): nibble p of a word is byte p // 2 of it (little-endian,
    as x86 and CUDA are), low half for even p."""
    *lead, nt, ko, _, half = words.shape
    b = words.contiguous().view(torch.uint8)  # [..., nt, ko, 32, 4 half]: (w, hsel, vhi)
    nib = torch.stack([b & 15, b >> 4], dim=-1).view(*lead, nt, ko, 8, 4, half, 2, 2, 2)  # split as _WORD
    t = nib.permute(*range(len(lead)), *(len(lead) + _WORD.index(d) for d in _TILE))  # as _TILE
    return t.reshape(*lead, nt * 8, ko * 32 * half)
