"""``nlnet.benchmark.LiveHeapPeak``: the peak of the bytes malloc has handed out during a block."""

from __future__ import annotations

import time

import pytest
import torch

from nlnet.benchmark import LiveHeapPeak, _heap_in_use

needs_mallinfo2 = pytest.mark.skipif(_heap_in_use() is None, reason="needs glibc's mallinfo2")


@needs_mallinfo2
def test_live_heap_peak_sees_a_tensor_freed_before_the_block_ends() -> None:
    with LiveHeapPeak() as live:
        x = torch.ones(48 << 18)  # 48 MiB, written
        deadline = time.monotonic() + 10  # the sampler runs every 0.5 ms, when it gets a core
        while (live.peak_mib or 0) < 47 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert float(x[-1]) == 1.0
        del x
    assert live.mib is not None and 47 < live.mib < 64


@needs_mallinfo2
def test_live_heap_peak_of_a_block_that_allocates_little_is_small() -> None:
    keep = torch.ones(48 << 18)  # allocated before: not part of the block's peak
    with LiveHeapPeak() as live:
        y = keep.sum()
    assert live.mib is not None and live.mib < 8 and float(y) == 48 << 18


def test_live_heap_peak_is_none_without_mallinfo2(monkeypatch) -> None:
    import nlnet.benchmark as bench

    monkeypatch.setattr(bench, "_heap_in_use", lambda: None)
    with bench.LiveHeapPeak() as live:
        torch.ones(1 << 18)
    assert live.mib is None
