"""Where many-token matmuls run: the one token-count threshold and the GEMM dtype of the CPU."""

from __future__ import annotations

import functools

import torch

# From this many tokens a call is a GEMM, not a decode: bf16/fp16 GEMMs are slow on CPUs without
# native support (fp32 is ~7x faster on AVX2), so float weights run on float32 copies and quantized
# weights are dequantised for one GEMM. CPUs with AVX512-BF16 (or AMX) run bfloat16 GEMMs natively,
# 2.6x faster than float32 on the Zen 4 this was measured on: there bfloat16 stays bfloat16 (gemm_dtype).
MANY_TOKENS = 16


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype that many-token matmuls of a `dtype` model run in on the CPU: its own where the CPU
    has native GEMMs for it (float32 always, bfloat16 with AVX512-BF16 / AMX), else float32."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and _native_bf16_gemm()):
        return dtype
    return torch.float32


def upcast(x: torch.Tensor) -> bool:
    """x [T, ...] is MANY_TOKENS or more CPU tokens of a dtype the CPU has no fast GEMM for."""
    return gemm_dtype(x.dtype) != x.dtype and x.device.type == "cpu" and x.shape[0] >= MANY_TOKENS


@functools.cache
def _native_bf16_gemm() -> bool:
    cpu = getattr(torch, "cpu", None)
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
