"""One way to mix seeds: every derived random stream in nlnet (data order, augmentation, the
synthetic clips, worker seeds) comes from :func:`derive_seed` of the run's seed and integers
naming the stream."""

from __future__ import annotations

import hashlib
import struct


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (a hash: stable across processes, platforms and versions)."""
    data = struct.pack(f"<{len(parts)}q", *(int(p) & 0x7FFFFFFFFFFFFFFF for p in parts))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1
