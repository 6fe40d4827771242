"""Model weights in 2 MB pages (Linux transparent huge pages), asked for before the weights are written.

A decode step streams every active weight once; with 4 KB pages that is a TLB miss every 4 KB and
a hardware prefetcher that stops at every page boundary. With weights in 2 MB pages bench-0.47b
decoded 1.05x faster in bfloat16 and int8 and 1.02x in int4 (both kinds of model loaded in one process,
runs alternated; a 2 MB page per fault also makes loading cheaper). The kernel honours the request where
THP is "always" or "madvise" (the usual default), only for whole 2 MB-aligned stretches, and only
for pages not yet touched: so `empty` aligns the tensor and asks before anything is written.
"""

from __future__ import annotations

import ctypes
import math
import sys

import torch

MADV_HUGEPAGE = 14  # linux/mman.h
HUGE_PAGE = 2 << 20
PAGE = 4096

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 256 << 20
keep_freed = True  # bench/bench_first_prefill.py turns it off for its baseline variants


def keep_freed_memory() -> bool:
    """glibc malloc: blocks up to 32 MiB from the heap rather than fresh mmaps, and up to 256 MiB of freed memory
    kept rather than trimmed, fixed from now on. By default the mmap threshold starts at 128 KiB and rises only as
    mmapped blocks are freed, so a process's first prefill maps, faults in and unmaps its big temporaries several
    times over: bench-0.47b bf16, 43k page faults against 14k, the first prefill 1.15x a warm one against 1.07x,
    peak RSS the same (bench/bench_first_prefill.py, docs/performance.md). True where glibc took both settings."""
    if _libc is None or not keep_freed or not hasattr(_libc, "mallopt"):  # not glibc (macOS, musl): nothing to do
        return False
    return _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and _libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


def advise(t: torch.Tensor) -> bool:
    """Ask for 2 MB pages under t's memory, from its first 4 KB page boundary to its last 2 MB one
    (a partial 2 MB page at the end would be filled out beyond the tensor); True if the kernel took
    the request. Only tensors of at least 2 MB on the CPU; pages already written keep their size."""
    nbytes = t.numel() * t.element_size()
    if _libc is None or t.device.type != "cpu" or nbytes < HUGE_PAGE:
        return False
    start = (t.data_ptr() + PAGE - 1) // PAGE * PAGE
    end = (t.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return False
    return _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE) == 0


def empty(shape, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """torch.empty for a weight that is about to be filled. On Linux CPUs, one of at least 2 MB starts
    on a 2 MB boundary (a view into an allocation 2 MB larger, whose slack is never touched, so never
    resident) and is advised into 2 MB pages."""
    nbytes = math.prod(shape) * dtype.itemsize
    if _libc is None or torch.device(device).type != "cpu" or nbytes < HUGE_PAGE:
        return torch.empty(shape, dtype=dtype, device=device)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    skip = -raw.data_ptr() % HUGE_PAGE
    t = raw[skip : skip + nbytes].view(dtype).view(shape)
    advise(t)
    return t
