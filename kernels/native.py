"""One-token (decode) kernels from the C extension kernels._cpu (kernels/cpu.h), with the checks the C
code leaves to its caller: single ops, a whole decode step (`step`, planned by kernels/decode_step.py),
and the bfloat16 -> float16 casts of moge convert.

Every op here returns None when it cannot run: the extension is not built (no compiler at install
time, not x86-64), the CPU lacks AVX2/FMA/F16C, the tensors are not one token of float32 / bfloat16
(weights also int8, or int4 words: weight_args) on the CPU, or MOGE_NATIVE=0. Callers then take the
torch path, which stays the reference: tests compare the two.

Shapes: H hidden, N output features, K input features, E experts, I expert width, k picks.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

try:
    from moge_kernels import _cpu
except ImportError:  # built optionally; see pyproject.toml
    _cpu = None

DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # activations (and scales)
WEIGHT_TYPES = {**DTYPES, torch.int8: 2, torch.int32: 3}  # int32: int4 in compressed-tensors words
_SUPPORTED = _cpu is not None and _cpu.supported()
_decoding = False  # inside decode_threads(), where the kernels run on torch's threads; elsewhere on the caller's alone


def available() -> bool:
    """The extension is built, the CPU can run it (AVX2, FMA, F16C), and MOGE_NATIVE is not 0."""
    return _cpu is not None and _SUPPORTED and os.environ.get("MOGE_NATIVE", "1") != "0"


def use_avx512(on: bool) -> bool:
    """Turn the int8 / int4 dot products' AVX-512 (VNNI) versions on or off (AVX2); returns whether
    they are now on: only where the extension is built and the CPU has AVX-512 VNNI. On by default."""
    return _cpu is not None and _SUPPORTED and _cpu.set_avx512(on)


@contextmanager
def decode_threads(active: bool = True) -> Iterator[None]:
    """While a decode step runs, these kernels get torch's threads and torch runs on one.

    Between calls the pool's workers spin for a moment (a step issues one every few microseconds);
    torch's own threads spinning on the same cores would slow both pools down several times.
    torch's share of a one-token step is small ops that gain nothing from threads anyway.
    """
    global _decoding
    if not active or _decoding or not available():
        yield
        return
    n = torch.get_num_threads()
    _cpu.set_threads(n)
    _decoding = True
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _cpu.set_threads(1)
        _decoding = False


def _usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    return (
        available()
        and x.device.type == "cpu"
        and x.dtype in DTYPES
        and x.is_contiguous()
        and all(isinstance(w, torch.Tensor) and w.dtype == x.dtype and w.device.type == "cpu" and w.is_contiguous() for w in weights)
    )


def weight_args(w: torch.Tensor, k: int, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> tuple | None:
    """(w, wtype, scale, sdtype, zero, group) for the C kernels (mat_t in kernels/cpu.h), or None if they cannot read it.

    w [..., N, K] float32 / bfloat16 without a scale; int8 [..., N, K] with a float32 / bfloat16
    scale [..., N]; or int4 as compressed-tensors int32 words [..., N, K/8] (value q + 8, low bits
    first) with a float32 scale [..., N, G] and uint8 zero [..., N, G] (zero point + 8): weight =
    (u - zero) * scale, groups of K/G columns (32, or a multiple of 64; K a multiple of 64).
    """
    if w.dtype not in WEIGHT_TYPES or w.device.type != "cpu" or not w.is_contiguous() or w.dim() < 2:
        return None
    lead, n = w.shape[:-2], w.shape[-2]
    if w.dtype == torch.int32:
        if k % 64 or w.shape[-1] * 8 != k or scale is None or zero is None or scale.dtype != torch.float32 or zero.dtype != torch.uint8:
            return None
        if not (scale.is_contiguous() and zero.is_contiguous()) or scale.shape != (*lead, n, scale.shape[-1]) or zero.shape != scale.shape:
            return None
        groups = scale.shape[-1]
        group = k // groups if groups and k % groups == 0 else 0
        if not (group == 32 or (group and group % 64 == 0)):
            return None
        return w.data_ptr(), WEIGHT_TYPES[w.dtype], scale.data_ptr(), 0, zero.data_ptr(), group
    if w.shape[-1] != k or zero is not None:
        return None
    if w.dtype != torch.int8:
        return (w.data_ptr(), WEIGHT_TYPES[w.dtype], 0, 0, 0, 0) if scale is None else None
    if scale is None or scale.dtype not in DTYPES or not scale.is_contiguous() or scale.shape != (*lead, n):
        return None
    return w.data_ptr(), WEIGHT_TYPES[w.dtype], scale.data_ptr(), DTYPES[scale.dtype], 0, 0


def linear_vec(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None
) -> torch.Tensor | None:
    """F.linear(x, w, b) for x [..., K] holding one token; w [N, K] (see weight_args for the integer
    types and their scale / zero), b [N]; None if it cannot run here."""
    k = x.shape[-1]
    if w.dim() != 2 or x.numel() != k or (args := weight_args(w, k, scale, zero)) is None:
        return None
    n = w.shape[0]
    if not _usable(x, *(() if b is None else (b,))) or (b is not None and b.shape != (n,)):
        return None
    if w.dtype in DTYPES and w.dtype != x.dtype:
        return None
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype)
    _cpu.linear(y.data_ptr(), x.data_ptr(), args[0], 0 if b is None else b.data_ptr(), n, k, DTYPES[x.dtype], *args[1:])
    return y


def moe_vec(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_scale: torch.Tensor | None = None,
    down_scale: torch.Tensor | None = None,
    gate_up_zero: torch.Tensor | None = None,
    down_zero: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Routed experts for one token, float32 [1, H]; None if it cannot run here.

    x [1, H], expert_ids [1, k] int64, weights [1, k] float32, gate_up [E, 2I, H], down [E, H, I]
    in x's dtype, or integer stacks with scales (and int4 zero points) as weight_args describes.
    Equals moe_experts up to float32 summation order; for bfloat16 the k expert outputs are summed
    in float32 without first rounding each one to bfloat16. Raises ValueError for ids outside 0..E-1.
    """
    if x.dim() != 2 or x.shape[0] != 1 or expert_ids.dtype != torch.int64 or weights.dtype != torch.float32:
        return None
    if not _usable(x) or not expert_ids.is_contiguous() or not weights.is_contiguous() or expert_ids.shape != weights.shape or expert_ids.dim() != 2:
        return None
    if gate_up.dim() != 3 or gate_up.dtype != down.dtype or (gate_up.dtype in DTYPES and gate_up.dtype != x.dtype):
        return None
    E, two_i, H = gate_up.shape[0], gate_up.shape[1], x.shape[1]
    inter = two_i // 2
    if down.shape[:2] != (E, H):
        return None
    gu, dn = weight_args(gate_up, H, gate_up_scale, gate_up_zero), weight_args(down, inter, down_scale, down_zero)
    if gu is None or dn is None or gu[3] != dn[3]:
        return None
    y = torch.empty(1, H, dtype=torch.float32)
    _cpu.moe(
        y.data_ptr(), x.data_ptr(), H, DTYPES[x.dtype], expert_ids.data_ptr(), weights.data_ptr(), expert_ids.shape[1],
        gu[0], dn[0], inter, E, gu[1], gu[2], dn[2], gu[3], gu[4], dn[4], gu[5], dn[5],
    )  # fmt: skip
    return y


def swiglu_vec(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor | None:
    """dense_mlp for one token (w13 [2I, H] gate rows then up, w2 [H, I]), float32 [1, H]; None if it cannot run."""
    if w13.dim() != 2 or w2.dim() != 2:
        return None
    return moe_vec(x, ONE_ID, ONE_WEIGHT, w13.unsqueeze(0), w2.unsqueeze(0))


ONE_ID = torch.zeros(1, 1, dtype=torch.int64)  # the single "expert" of a dense MLP, with weight 1
ONE_WEIGHT = torch.ones(1, 1, dtype=torch.float32)


def rms_norm_vec(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """model.rms_norm for one token (x [..., H] in float32 / bfloat16, weight [H] float32); None if it cannot run."""
    if x.numel() != x.shape[-1] or weight.dtype != torch.float32 or weight.shape != (x.shape[-1],) or not _usable(x) or not weight.is_contiguous():
        return None
    y = torch.empty_like(x)
    _cpu.rms_norm(y.data_ptr(), x.data_ptr(), weight.data_ptr(), x.shape[-1], eps, DTYPES[x.dtype])
    return y


def route_vec(logits: torch.Tensor, n_groups: int, picks_per_group: int, router_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """kernels.route for one token: logits [1, E] float32 -> (expert_ids [1, k] int64, weights [1, k] float32); None if it cannot run."""
    if logits.dim() != 2 or logits.shape[0] != 1 or logits.dtype != torch.float32 or router_scale.dtype != torch.float32:
        return None
    E = logits.shape[1]
    if not _usable(logits) or not router_scale.is_contiguous() or router_scale.numel() != E or E > 4096 or n_groups <= 0 or E % n_groups:
        return None
    if not 0 < picks_per_group <= E // n_groups:
        return None
    k = n_groups * picks_per_group
    ids, weights = torch.empty(1, k, dtype=torch.int64), torch.empty(1, k, dtype=torch.float32)
    _cpu.route(ids.data_ptr(), weights.data_ptr(), logits.data_ptr(), E, n_groups, picks_per_group, router_scale.data_ptr())
    return ids, weights


def attend_vec(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int, n_heads: int) -> torch.Tensor | None:
    """One token's attention, batch 1: RoPE on q and k, k and v written to the cache at pos, attention
    over positions 0..pos. qkv [..., (nH + 2 nKV) D], cos / sin [D] float32 (row pos of the model's
    tables), caches [1, nKV, S, D]. Returns o [nH D] in qkv's dtype, or None if it cannot run here."""
    if k_cache.dim() != 4 or k_cache.shape[0] != 1 or v_cache.shape != k_cache.shape:
        return None
    _, n_kv, s_max, dim = k_cache.shape
    if qkv.numel() != (n_heads + 2 * n_kv) * dim or not 0 <= pos < s_max or cos.shape != (dim,) or sin.shape != (dim,):
        return None
    if not _usable(qkv, k_cache, v_cache) or cos.dtype != torch.float32 or sin.dtype != torch.float32 or not (cos.is_contiguous() and sin.is_contiguous()):
        return None
    o = torch.empty(n_heads * dim, dtype=qkv.dtype)
    _cpu.attend(
        o.data_ptr(), qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        pos, n_heads, n_kv, dim, s_max, DTYPES[qkv.dtype],
    )  # fmt: skip
    return o


def dequant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """One integer weight (weight_args: int8 [N, K] with a scale per row, or int4 words [N, K/8] with
    float32 scale and uint8 zero [N, G]) -> [N, K] in dtype (float32 / bfloat16), the values torch's
    path computes: int8 w.to(dtype) * scale.to(dtype); int4 (u - zero) * scale rounded to bfloat16.
    None if it cannot run here."""
    if not available() or dtype not in DTYPES or w.dim() != 2 or w.dtype not in (torch.int8, torch.int32):
        return None
    k = w.shape[1] * (8 if w.dtype == torch.int32 else 1)
    if (args := weight_args(w, k, scale, zero)) is None:
        return None
    out = torch.empty(w.shape[0], k, dtype=dtype)
    _cpu.dequant(out.data_ptr(), DTYPES[dtype], *args[:5], w.shape[0], k, args[5])
    return out


def check_plan(plan: torch.Tensor) -> None:
    """Raise ValueError if kernels/step.c cannot run this plan (weight types, routing counts, shapes)."""
    _cpu.check_plan(plan.data_ptr())


def step_addresses(k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[int, ...]:
    """Check a decode step's caches and RoPE tables once, and return what `step` needs of them:
    caches [L, 1, nKV, S, D] contiguous on the CPU in the plan's dtype; cos, sin [P, D] contiguous float32."""
    for t in (k_cache, v_cache):
        if not t.is_contiguous() or t.dim() != 5 or t.shape[1] != 1 or t.device.type != "cpu":
            raise ValueError("step: caches must be contiguous [L, 1, nKV, S, D] on the CPU")
    if not (cos.is_contiguous() and sin.is_contiguous() and cos.dtype == sin.dtype == torch.float32 and cos.dim() == 2 and cos.shape == sin.shape):
        raise ValueError("step: cos and sin must be contiguous float32 tables [positions, D]")
    return k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[3], cos.data_ptr(), sin.data_ptr(), cos.shape[0], cos.shape[1] * 4


def step(plan: int, logits: int, token: int, pos: int, addresses: tuple[int, ...], eps: float) -> None:
    """kernels/step.c: a whole decode step of one token at pos from a plan (kernels/decode_step.py;
    its address, for a plan check_plan accepted) into logits [V] float32 (an address), with addresses
    from step_addresses. It runs on torch's thread count (torch runs nothing meanwhile).
    Raises ValueError for a position outside the cache or the RoPE tables."""
    k, v, s_max, cos, sin, positions, row = addresses
    if not 0 <= pos < positions:
        raise ValueError("step: position outside the RoPE tables")
    _cpu.step(plan, logits, token, pos, k, v, s_max, cos + pos * row, sin + pos * row, eps, torch.get_num_threads())


def cast_bf16_f16(x: torch.Tensor, y: torch.Tensor) -> int | None:
    """y[:] = x.to(float16) for contiguous bfloat16 x and float16 y of the same size, one pass; returns the
    number of finite values beyond +-65504 (made +-inf), or None if it cannot run here."""
    if not available() or x.dtype != torch.bfloat16 or y.dtype != torch.float16 or x.numel() != y.numel():
        return None
    if x.device.type != "cpu" or y.device.type != "cpu" or not x.is_contiguous() or not y.is_contiguous():
        return None
    return _cpu.cast_bf16_f16(y.data_ptr(), x.data_ptr(), x.numel())


def cast_file_bf16_f16(fd: int, offset: int, y: torch.Tensor) -> int | None:
    """y[:] = the y.numel() bfloat16 values at byte `offset` of an open file, as float16, read and cast in
    one call (the GIL released once); returns the overflow count (as cast_bf16_f16), or None if it cannot run.
    Raises OSError on a read error or a file that ends early."""
    if not available() or y.dtype != torch.float16 or y.device.type != "cpu" or not y.is_contiguous():
        return None
    return _cpu.cast_file_bf16_f16(y.data_ptr(), fd, offset, y.numel())
