"""Weight-only integer quantization math: round-to-nearest, an MSE search, dequantization, error statistics.

Pure functions on tensors; no files. The stored form is compressed-tensors' "pack-quantized":
signed integers q in [-2^(b-1), 2^(b-1)-1], a scale per output channel ([N, 1]) or per group of
`group_size` input columns ([N, K/gs]), and for asymmetric schemes an integer zero point z in the
same signed range. Dequantization, exactly as compressed-tensors does it, in the scale's dtype:

    w = (q.to(s.dtype) - z.to(s.dtype)) * s        (symmetric: w = q.to(s.dtype) * s)

Packing into int32 words (pack_int32 / unpack_int32) is part of the stored format: moge_cli.quant_format.
Weights are packed along dim 1 ([N, ceil(K*b/32)]), zero points along dim 0 ([ceil(N*b/32), G]).
N output channels (rows), K input columns, G groups per row, gs group size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moge_cli.quant_format import Scheme
from moge_kernels.qlinear import dequantize as dequantize_parts

GROUP_SIZES = (32, 64, 128)
METHODS = ("rtn", "mse")
# The MSE search: clipping ratios tried for every group / channel, then alternating refinement.
CLIP_RATIOS = tuple(1.0 - 0.03 * i for i in range(16))  # 1.00 .. 0.55
REFINE_STEPS = 4


@dataclass
class QTensor:
    """One quantized 2-D weight: q int8 [N, K], scale [N, G] (scale dtype), zero int8 [N, G] or None."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


# ---- quantization ------------------------------------------------------------------------------
def quantize(w: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype, importance: torch.Tensor | None = None) -> QTensor:
    """Quantize w [N, K] (any float dtype) with `scheme`; the scale is stored in scale_dtype.

    Rows are independent, so callers may quantize a weight in row blocks and concatenate.
    The integers are always computed from the scale as stored (rounded to scale_dtype).
    importance [K] (method mse only): how much each input column's error costs, e.g. the mean square
    of the activations it meets (converters/calibrate.py); the search then minimises
    sum_j importance_j * (w_j - w'_j)^2 per group, the output error those activations would see.
    """
    n, k = w.shape
    gs = k if scheme.group_size is None else scheme.group_size
    if k % gs:
        raise ValueError(f"{k} input columns are not a multiple of the group size {gs}")
    x = w.float().reshape(n, k // gs, gs)  # [N, G, gs]
    if importance is not None and scheme.method != "mse":
        raise ValueError("column importance weights the mse search; use method mse")
    if scheme.method == "rtn":
        s, z = _rtn_params(x, scheme, scale_dtype)
    elif scheme.method == "mse":
        a = None if importance is None else importance.float().reshape(1, k // gs, gs)  # [1, G, gs]
        s, z = _mse_params(x, scheme, scale_dtype, a)
    else:
        raise ValueError(f"unknown method {scheme.method!r}")
    q = _round(x, s, z, scheme)
    return QTensor(q.reshape(n, k).to(torch.int8), s.to(scale_dtype), None if z is None else z.to(torch.int8))


def dequantize(t: QTensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[N, K] weight in the scale's dtype (then out_dtype), bit-for-bit as compressed-tensors computes it
    (the runtime's moge_kernels.qlinear.dequantize: one definition for both)."""
    w = dequantize_parts(t.q, t.scale, t.zero)
    return w if out_dtype is None else w.to(out_dtype)


def _round(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, scheme: Scheme) -> torch.Tensor:
    """Integers of x [N, G, gs] for scale s [N, G] (float32 values of the stored scale) and zero z [N, G]."""
    q = torch.round(x / s.unsqueeze(-1))
    if z is not None:
        q = q + z.unsqueeze(-1)
    return q.clamp_(scheme.qmin, scheme.qmax)


def _stored(s: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """The scale rounded to its storage dtype (float32 values); never zero or subnormal-small."""
    tiny = torch.finfo(scale_dtype).tiny
    s = torch.where(s > tiny, s, torch.ones_like(s))  # an all-zero group: any scale reproduces it
    return s.to(scale_dtype).float()


def _rtn_params(x: torch.Tensor, scheme: Scheme, scale_dtype, ratio: float | torch.Tensor = 1.0):
    """Min/max (asymmetric) or abs-max (symmetric) scale and zero of each group, range shrunk by `ratio`."""
    if scheme.symmetric:
        s = _stored(x.abs().amax(-1) * ratio / scheme.qmax, scale_dtype)
        return s, None
    lo = x.amin(-1).clamp(max=0) * ratio  # the range always holds 0, so 0 is exact
    hi = x.amax(-1).clamp(min=0) * ratio
    s = _stored((hi - lo) / (scheme.qmax - scheme.qmin), scale_dtype)
    z = torch.round(scheme.qmin - lo / s).clamp_(scheme.qmin, scheme.qmax)
    return s, z


def _group_error(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, scheme: Scheme, a: torch.Tensor | None = None) -> torch.Tensor:
    """Squared reconstruction error of each group [N, G] (float32), each column's weighted by a [1, G, gs]."""
    q = _round(x, s, z, scheme)
    if z is not None:
        q = q - z.unsqueeze(-1)
    e = (q * s.unsqueeze(-1) - x).pow_(2)
    return (e if a is None else e.mul_(a)).sum(-1)


def _mse_params(x: torch.Tensor, scheme: Scheme, scale_dtype, a: torch.Tensor | None = None):
    """Search for the scale (and zero) of each group that minimise its squared error, each column's
    weighted by a [1, G, gs] when given (activation-aware), else all alike (calibration-free).

    1. Clipping: the min/max range shrunk by each of CLIP_RATIOS; the best ratio per group wins.
    2. Refinement (HQQ-like alternation): with the integers fixed, the (weighted) least-squares scale
       (and the best integer zero point), then re-round; a group keeps a step only if its error went down.
    Ratio 1.0 is round-to-nearest itself, so the result is never worse than rtn (by the same measure).
    """
    wt = torch.ones_like(x[:1]) if a is None else a  # [1, G, gs]
    s, z = _rtn_params(x, scheme, scale_dtype)
    best = (_group_error(x, s, z, scheme, a), s, z)  # per group: error, scale, zero
    for r in CLIP_RATIOS[1:]:
        s, z = _rtn_params(x, scheme, scale_dtype, r)
        best = _lower(_group_error(x, s, z, scheme, a), s, z, best)
    _, s, z = best
    for _ in range(REFINE_STEPS):
        q = _round(x, s, z, scheme)  # [N, G, gs]
        if z is None:
            num, den = (wt * x * q).sum(-1), (wt * q.pow(2)).sum(-1)
            s = _stored(torch.where(den > 0, num / den.clamp(min=1e-30), s), scale_dtype)
        else:
            # weighted least squares of x ~ a*q + c over the group, then z = round(-c / a)
            total = wt.sum(-1).clamp(min=1e-30)  # [1, G]
            qm, xm = (wt * q).sum(-1) / total, (wt * x).sum(-1) / total
            cov = (wt * (q - qm.unsqueeze(-1)) * (x - xm.unsqueeze(-1))).sum(-1)
            var = (wt * (q - qm.unsqueeze(-1)).pow(2)).sum(-1)
            slope = torch.where(var > 0, cov / var.clamp(min=1e-30), s)
            slope = torch.where(slope > 0, slope, s)
            c = xm - slope * qm
            z = torch.round(-c / slope).clamp_(scheme.qmin, scheme.qmax)
            d = q - z.unsqueeze(-1)  # integers relative to the new zero
            den = (wt * d.pow(2)).sum(-1)
            s = _stored(torch.where(den > 0, (wt * x * d).sum(-1) / den.clamp(min=1e-30), slope), scale_dtype)
        best = _lower(_group_error(x, s, z, scheme, a), s, z, best)
        _, s, z = best
    return s, z


def _lower(e: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, best: tuple) -> tuple:
    """Per group, the candidate (error e, scale s, zero z) where its error is lower than best's, else best's."""
    best_e, best_s, best_z = best
    lower = e < best_e
    return torch.where(lower, e, best_e), torch.where(lower, s, best_s), None if z is None else torch.where(lower, z, best_z)


# ---- error -------------------------------------------------------------------------------------
def error_sums(w: torch.Tensor, wq: torch.Tensor) -> tuple[float, float]:
    """(sum of squared error, sum of squared weight), accumulated in float64, for pooling over row blocks."""
    w = w.float()
    d = wq.float() - w
    return float(torch.sum(d * d, dtype=torch.float64)), float(torch.sum(w * w, dtype=torch.float64))


def error_stats(err2: float, ref2: float) -> dict[str, float]:
    """Relative Frobenius error ||W - Wq|| / ||W|| and SQNR in dB (10 log10 of signal over noise)."""
    rel = math.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else math.inf)
    sqnr = math.inf if err2 == 0 else (10 * math.log10(ref2 / err2) if ref2 > 0 else -math.inf)
    return {"rel_error": rel, "sqnr_db": sqnr}
