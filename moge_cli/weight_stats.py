"""Weight profile (`moge profile --weights`): per-tensor statistics, streamed, never a full load.

Each tensor is read from its memory map in row chunks (two passes: moments, then outliers), so
memory stays bounded by CHUNK_ELEMENTS floats whatever the tensor size.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable

from moge_cli.checkpoint import Checkpoint
from moge_cli.names import component_of

FP16_MAX = 65504.0
OUTLIER_SIGMAS = 6.0
CHUNK_ELEMENTS = 16 * 1024 * 1024  # float32 elements per chunk: 64 MB


def _chunks(t: Any) -> list[Any]:
    flat = t.reshape(-1)
    return [flat[i : i + CHUNK_ELEMENTS] for i in range(0, flat.numel(), CHUNK_ELEMENTS)]


def tensor_stats(t: Any) -> dict[str, float]:
    """absmax, mean, std, outlier fraction (|w - mean| > 6 std), fp16 overflow count, zero fraction."""
    import torch

    n = t.numel()
    if n == 0 or not t.is_floating_point():
        return {"numel": n, "absmax": 0.0, "mean": 0.0, "std": 0.0, "outlier_fraction": 0.0, "fp16_overflow": 0, "zero_fraction": 0.0}
    s1 = s2 = 0.0
    absmax, zeros, overflow = 0.0, 0, 0
    for c in _chunks(t):
        c = c.to(torch.float64)
        s1 += float(c.sum())
        s2 += float((c * c).sum())
        a = c.abs()
        absmax = max(absmax, float(a.max()))
        zeros += int((c == 0).sum())
        overflow += int((a > FP16_MAX).sum())
    mean = s1 / n
    std = math.sqrt(max(s2 / n - mean * mean, 0.0))
    outliers = 0
    if std > 0:
        for c in _chunks(t):
            outliers += int(((c.to(torch.float64) - mean).abs() > OUTLIER_SIGMAS * std).sum())
    return {
        "numel": n,
        "absmax": absmax,
        "mean": mean,
        "std": std,
        "outlier_fraction": outliers / n,
        "fp16_overflow": overflow,
        "zero_fraction": zeros / n,
    }


def weight_profile(ckpt: Checkpoint, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Per-tensor stats, a summary per component, and one line of quantization advice."""
    per_tensor: dict[str, dict[str, float]] = {}
    total = sum(t.nbytes for t in ckpt.tensors.values())
    for name, info in ckpt.tensors.items():
        per_tensor[name] = tensor_stats(ckpt.tensor(name))
        if progress:
            progress(info.nbytes, total)
    components = summarize_components(per_tensor)
    return {"tensors": per_tensor, "components": components, "advice": advice(components)}


def summarize_components(per_tensor: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for name, s in per_tensor.items():
        c = acc[component_of(name)]
        n = s["numel"]
        c["tensors"] += 1
        c["numel"] += n
        c["absmax"] = max(c["absmax"], s["absmax"])
        c["std_weighted"] += s["std"] * n
        c["outliers"] += s["outlier_fraction"] * n
        c["zeros"] += s["zero_fraction"] * n
        c["fp16_overflow"] += s["fp16_overflow"]
    out = {}
    for comp, c in sorted(acc.items()):
        n = max(c["numel"], 1)
        out[comp] = {
            "tensors": int(c["tensors"]),
            "numel": int(c["numel"]),
            "absmax": c["absmax"],
            "mean_std": c["std_weighted"] / n,
            "outlier_fraction": c["outliers"] / n,
            "zero_fraction": c["zeros"] / n,
            "fp16_overflow": int(c["fp16_overflow"]),
        }
    return out


QUANTIZABLE = ("attention", "routed_experts", "shared_experts", "dense_mlp")


def advice(components: dict[str, dict[str, float]]) -> str:
    """One line: what quantizes safely, judged from outliers and range."""
    overflow = sum(c["fp16_overflow"] for c in components.values())
    risky = [k for k in QUANTIZABLE if k in components and components[k]["outlier_fraction"] > 1e-3]
    parts = []
    if overflow:
        parts.append(f"float16 is unsafe ({overflow} values beyond +-65504: keep bfloat16 or convert with --clamp)")
    else:
        parts.append("float16 is safe (no value beyond +-65504)")
    present = [k for k in QUANTIZABLE if k in components]
    if risky:
        safe = [k for k in present if k not in risky]
        parts.append(
            f"int8 per-channel is safe for {', '.join(present)}; int4 needs care for {', '.join(risky)} "
            f"(more than 0.1% of weights beyond 6 sigma: prefer --method mse or a smaller --group-size)"
            + (f", int4 g128 is fine for {', '.join(safe)}" if safe else "")
        )
    else:
        parts.append(f"int8 per-channel and int4 g128 are safe for {', '.join(present)} (outliers under 0.1%)")
    return "; ".join(parts) + "."
