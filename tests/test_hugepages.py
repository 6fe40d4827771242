"""moge_cli.hugepages: weights allocated 2 MB-aligned and advised into 2 MB pages before they are written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from moge_cli import hugepages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")


def anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds address (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


@linux
def test_big_weights_start_on_a_2mb_boundary_and_small_ones_are_plain():
    big = hugepages.empty((3, 1024, 1024), torch.bfloat16)  # 6 MiB
    assert big.shape == (3, 1024, 1024) and big.dtype == torch.bfloat16 and big.is_contiguous()
    assert big.data_ptr() % hugepages.HUGE_PAGE == 0
    big.fill_(1.5)
    assert float(big.float().sum()) == 1.5 * big.numel()
    small = hugepages.empty((100, 100), torch.float32)
    assert small.shape == (100, 100) and small.untyped_storage().nbytes() == 100 * 100 * 4
    assert not hugepages.advise(small)  # under 2 MB: nothing to ask for


@linux
@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="transparent huge pages are off here")
def test_filled_weights_sit_in_huge_pages():
    t = hugepages.empty((16 << 20,), torch.uint8)  # 16 MiB
    assert hugepages.advise(t)
    t.fill_(7)
    assert anon_huge_kib(t.data_ptr()) >= 2048  # at least one 2 MB page (the kernel may lack free ones for all)


def test_other_devices_and_platforms_get_plain_tensors(monkeypatch):
    monkeypatch.setattr(hugepages, "_libc", None)
    t = hugepages.empty((2048, 1024), torch.float32)
    assert t.untyped_storage().nbytes() == 2048 * 1024 * 4
    assert not hugepages.advise(t)


def test_keep_freed_memory_sets_glibcs_thresholds_once_loading(monkeypatch, tmp_path):
    """load_model fixes glibc's mmap and trim thresholds before it allocates (the first prefill then runs as a warm
    one); where there is no mallopt (not glibc) it does nothing."""
    from moge_cli import hugepages
    from moge_cli.loader import load_model

    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(hugepages, "_libc", Libc())
    load_model(Path(__file__).resolve().parents[1] / "fixtures" / "tiny-moge")
    assert calls == [(hugepages.M_MMAP_THRESHOLD, 32 << 20), (hugepages.M_TRIM_THRESHOLD, 256 << 20)]
    monkeypatch.setattr(hugepages, "keep_freed", False)  # the bench's baseline variants
    assert hugepages.keep_freed_memory() is False and len(calls) == 2
    monkeypatch.setattr(hugepages, "keep_freed", True)
    monkeypatch.setattr(hugepages, "_libc", object())  # no mallopt: musl, or not Linux
    assert hugepages.keep_freed_memory() is False
