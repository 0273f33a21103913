"""The kernels' tests run at small sizes: keep them on the kernels.

``backend="auto"`` trains small affinities (B·Nq·Nk ≤ ``EXPLICIT_TRAINING_MAX_AFFINITY``) on
CPU with plain products on the explicit matrix; these tests exist to check the blocked and fused
kernels, so the rule is off here (``test_small_training_affinity_uses_plain_products`` turns it
back on).
"""

from __future__ import annotations

import pytest

import nlnet.ops.fast as fast_mod


@pytest.fixture(autouse=True)
def _kernels_at_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast_mod, "EXPLICIT_TRAINING_MAX_AFFINITY", 0)
