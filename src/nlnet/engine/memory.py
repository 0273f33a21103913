"""Giving a CPU training step's freed memory back to the system (glibc's malloc, Linux).

glibc keeps freed blocks below its mmap threshold in the heap for reuse, and that threshold
rises on its own up to 32 MiB.  A training step frees and allocates activations of 1–32 MiB in
a different order in the backward than in the forward, so the heap fragments and the process
keeps memory it no longer uses: for I3D-NL5 R50 at 32×224², nlnet's lean training step had a
live heap of 379 MiB but a peak RSS of 606–696 MiB.  With the threshold fixed at 4 MiB, blocks
of 4 MiB and more are mapped for each use and unmapped when freed, so the peak RSS follows the
live heap (427–442 MiB).

Mapping a block anew costs page faults on its first use.  With 4 KiB pages that made the step
about 7% slower; with PyTorch's transparent-huge-page allocations (``THP_MEM_ALLOC_ENABLE=1``,
which the ``nlnet`` command sets before PyTorch loads) the faults are 2 MiB each and the step
measured no slower (BENCHMARKS.md, "Whole model").  So :func:`release_freed_memory` applies the
setting only where huge pages are in use.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Blocks of this size and more are mapped per use (and unmapped when freed) while applied.
MMAP_THRESHOLD = 4 << 20
#: glibc's ceiling for its own dynamic threshold on 64-bit systems: what a long-running process
#: ends at after its first large frees, and what :func:`release_freed_memory` sets on exit.
GLIBC_DYNAMIC_CEILING = 32 << 20
#: PyTorch's switch for 2 MiB-aligned, ``MADV_HUGEPAGE`` CPU allocations of 2 MiB and more
#: (read once, at PyTorch's first CPU allocation).
THP_ENV = "THP_MEM_ALLOC_ENABLE"
#: Where Linux says whether transparent huge pages are used ("[always]", "[madvise]" or "[never]").
THP_SYSFS = Path("/sys/kernel/mm/transparent_hugepage/enabled")

_M_TRIM_THRESHOLD = -1  # mallopt parameters, glibc's malloc.h
_M_MMAP_THRESHOLD = -3


@dataclass(frozen=True)
class MemoryPolicy:
    """Whether :func:`release_freed_memory` changed the allocator, and why (or why not)."""

    applied: bool
    reason: str


def thp_allocations() -> bool:
    """True if PyTorch is told to use transparent huge pages (``THP_MEM_ALLOC_ENABLE``)."""
    return os.environ.get(THP_ENV, "").strip().lower() in ("1", "true", "yes", "on", "y")


def huge_pages_enabled(sysfs: Path | None = None) -> bool:
    """True unless Linux's transparent huge pages are off (or the setting cannot be read)."""
    try:
        text = (sysfs or THP_SYSFS).read_text()
    except OSError:
        return False
    return "[never]" not in text and "[" in text


def user_malloc_settings() -> list[str]:
    """The environment settings by which the user chose glibc's thresholds (they win)."""
    chosen = [
        name for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if name in os.environ
    ]
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    chosen += [
        f"GLIBC_TUNABLES={item}"
        for item in tunables.split(":")
        if item.split("=")[0] in ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")
    ]
    return chosen


@functools.cache
def glibc() -> Any | None:
    """glibc (``mallopt``, ``mallinfo2`` where ≥ 2.33) through ctypes, or None elsewhere (musl has
    ``mallopt`` but ignores these parameters)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
        return libc
    except (OSError, AttributeError):
        return None


def _set(libc: Any, threshold: int) -> bool:
    """mmap threshold ``threshold`` and trim threshold 2× (glibc's own ratio); True if taken."""
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * threshold)
    )


def decide(libc: Any | None = None, sysfs: Path | None = None) -> MemoryPolicy:
    """Whether the 4 MiB mmap threshold would be applied here, and why (applies nothing)."""
    libc = glibc() if libc is None else libc
    if libc is None:
        return MemoryPolicy(False, "not glibc on Linux")
    if chosen := user_malloc_settings():
        return MemoryPolicy(
            False, f"the environment chooses glibc's thresholds ({', '.join(chosen)})"
        )
    if not thp_allocations():
        return MemoryPolicy(
            False,
            f"{THP_ENV} is not set: with 4 KiB pages, mapping blocks anew costs ~7% of a step "
            "(the nlnet command sets it)",
        )
    if not huge_pages_enabled(sysfs):
        return MemoryPolicy(False, "transparent huge pages are off in this kernel")
    return MemoryPolicy(
        True, f"blocks of {MMAP_THRESHOLD >> 20} MiB and more are unmapped when freed"
    )


@contextmanager
def release_freed_memory(
    enabled: bool = True, libc: Any | None = None, sysfs: Path | None = None
) -> Iterator[MemoryPolicy]:
    """While inside, glibc unmaps freed blocks of ``MMAP_THRESHOLD`` and more (see the module).

    Yields the :class:`MemoryPolicy` taken.  The setting is process-wide (like PyTorch's thread
    count); on exit, if it was applied, the thresholds become glibc's dynamic ceiling (32 MiB),
    where a process that has freed large blocks ends up on its own.
    """
    if not enabled:
        yield MemoryPolicy(False, "disabled (train.release_memory=false)")
        return
    libc = glibc() if libc is None else libc
    policy = decide(libc, sysfs)
    if policy.applied and not _set(libc, MMAP_THRESHOLD):
        policy = MemoryPolicy(False, "mallopt refused the thresholds")
    try:
        yield policy
    finally:
        if policy.applied:
            _set(libc, GLIBC_DYNAMIC_CEILING)
