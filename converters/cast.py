"""dtype casts in bounded chunks, counting float16 overflows (converters/overflow.py refuses or reports them).

The one converter module that computes on tensors: convert imports it only for a plan that casts.

The cast is torch's round-to-nearest-even `.to(dtype)`. A value overflows float16 when it is
finite and its magnitude exceeds 65504 (the largest float16). Without clamp such values would
become +-inf; with clamp they become +-65504. NaN and +-inf in the source are not overflows
and pass through unchanged either way.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

from moge_kernels import native
from moge_cli.errors import CheckpointError
from moge_cli.safetensors_format import TORCH_NAMES

from moge_converters.overflow import FP16_MAX

CHUNK_ELEMS = 1 << 18  # elements cast at a time: 512 KB of bf16 in, 1 MB of float32, 512 KB out: stays in L2
BLOCK_ELEMS = 1 << 20  # elements per task of the caster pool: cast, then written with one pwrite


def torch_dtype(code: str) -> torch.dtype:
    return getattr(torch, TORCH_NAMES[code])


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of t (a copy only if t is not contiguous)."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch ops on one thread meanwhile: casts are memory-bound, in cache-sized chunks, and a thread pool costs more than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Caster:
    """Casts one dtype to another into caller-given slices, CHUNK_ELEMS at a time, counting float16 overflows.

    `block` is an output buffer of BLOCK_ELEMS elements for the caller to fill (one Caster per
    thread). bfloat16 -> float16 goes through a cache-sized float32 buffer: two vectorized copies
    are several times faster than torch's direct path and give the same bits (bfloat16 -> float32
    is exact; the direct path goes through float too). Not float16 -> bfloat16: there the NaN
    payloads would differ. Where kernels/cpu.c is built, bfloat16 -> float16 is its one-pass cast,
    which also counts the overflows (the torch path then runs only to clamp them).
    """

    def __init__(self, src: torch.dtype, dst: torch.dtype, clamp: bool, block: int = BLOCK_ELEMS):
        self.src, self.dst, self.clamp = src, dst, clamp
        self.block = torch.empty(block, dtype=dst)
        self.mid = torch.empty(CHUNK_ELEMS, dtype=torch.float32) if (src, dst) == (torch.bfloat16, torch.float16) else None
        self.checks = dst == torch.float16 and src != torch.float16 and src.is_floating_point
        self.raw: torch.Tensor | None = None  # read buffer of cast_file_into

    def cast_block(self, src, a: int, k: int) -> tuple[int, memoryview]:
        """Cast k source elements from element a into this caster's block: (overflows, the bytes of the block's first k).
        src: (fd, byte offset of the tensor) of a safetensors file, or the tensor as a 1-D tensor."""
        y = self.block[:k]
        if isinstance(src, tuple):
            n = self.cast_file_into(src[0], src[1] + a * self.src.itemsize, y)
        else:
            n = self.cast_into(src[a : a + k], y)
        return n, byte_view(y)

    def cast_into(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """y[:] = x cast (clamped when clamp=True); returns the number of finite values beyond +-65504."""
        n = 0
        for a in range(0, x.numel(), CHUNK_ELEMS):
            n += self._chunk(x[a : a + CHUNK_ELEMS], y[a : a + CHUNK_ELEMS])
        return n

    def cast_file_into(self, fd: int, offset: int, y: torch.Tensor) -> int:
        """Like cast_into for the y.numel() source values at byte `offset` of an open file, read with
        pread into a cache-sized buffer (no page faults on a shared memory map, no copy kept)."""
        if self.mid is not None and not self.clamp:  # bfloat16 -> float16: read and cast in one kernels/cpu.c call
            try:
                n = native.cast_file_bf16_f16(fd, offset, y)
            except OSError as e:
                raise CheckpointError(f"cannot read the source file at byte {offset} ({e.strerror or 'it ends early: truncated?'})") from None
            if n is not None:
                return n
        if self.raw is None:
            self.raw = torch.empty(CHUNK_ELEMS * self.src.itemsize, dtype=torch.uint8)
            self.raw_view = memoryview(self.raw.numpy())
        n, size = 0, self.src.itemsize
        for a in range(0, y.numel(), CHUNK_ELEMS):
            k = min(CHUNK_ELEMS, y.numel() - a)
            got = os.preadv(fd, [self.raw_view[: k * size]], offset + a * size)
            if got != k * size:
                raise CheckpointError(f"source file ended early at byte {offset + a * size + got} (truncated?)")
            n += self._chunk(self.raw[: k * size].view(self.src), y[a : a + k])
        return n

    def _chunk(self, x: torch.Tensor, y: torch.Tensor) -> int:
        k = x.numel()
        if self.mid is not None and (n := native.cast_bf16_f16(x, y)) is not None:  # kernels/cpu.c: one pass
            if not n or not self.clamp:
                return n
        elif self.mid is not None:
            y.copy_(self.mid[:k].copy_(x))
        else:
            y.copy_(x)
        if not self.checks or k == 0:
            return 0
        lo, hi = torch.aminmax(y)
        if -FP16_MAX < float(lo) and float(hi) < FP16_MAX:  # the usual chunk; false for NaN, then count exactly
            return 0
        xf = _wide(x)
        finite = torch.isfinite(xf)
        n = int(((xf.abs() > FP16_MAX) & finite).sum())
        if n and self.clamp:
            y.copy_(torch.where(finite, xf.clamp(-FP16_MAX, FP16_MAX), xf))
        return n


def cast_exact(x: torch.Tensor, dtype: torch.dtype, clamp: bool) -> torch.Tensor:
    """The reference cast --verify compares against: the same rule, written the obvious way."""
    if clamp and dtype == torch.float16 and x.is_floating_point():
        xf = _wide(x)
        return torch.where(torch.isfinite(xf), xf.clamp(-FP16_MAX, FP16_MAX), xf).to(dtype)
    return x.to(dtype)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in a dtype that holds 65504 exactly and every value of x (bf16 -> fp32; fp32/fp64 as they are)."""
    return x if x.element_size() >= 4 else x.float()
