"""How a non-local block cuts a clip into attention problems (§3.3, §4: extent and sub-sampling).

One home for the geometry the block (``NonLocalBlock.forward``), the FLOPs count
(:func:`nlnet.models.flops.attention_flops`) and the attention figures
(:func:`nlnet.viz.attention.dense_attention`) all rely on:

* the keys live on the sub-sampled grid x̂ = max-pool(x) (§3.3): (T // kT, H // kH, W // kW);
* ``extent="spacetime"`` attends over all T·H·W positions of a clip (Eq. 1), or within groups of
  ``temporal_groups`` consecutive frames (the original code's grouping); ``space`` within each
  frame; ``time`` along time at each (h, w).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

EXTENTS: tuple[str, ...] = ("spacetime", "space", "time")

Shape3 = tuple[int, int, int]


class AttentionProblems(NamedTuple):
    """Independent attention problems per clip, and the queries Nq / keys Nk of each."""

    groups: int
    queries: int
    keys: int


def key_shape(query_shape: Sequence[int], subsample: Sequence[int] | None) -> Shape3:
    """(Tk, Hk, Wk) of the keys for queries on ``query_shape`` (T, H, W) and a pooling kernel.

    ``subsample`` is the block's kernel (kT, kH, kW), or ``None`` for no sub-sampling; max-pool
    with stride = kernel floors each axis.
    """
    t, h, w = query_shape
    kt, kh, kw = (1, 1, 1) if subsample is None else subsample
    return (t // kt, h // kh, w // kw)


def attention_problems(
    extent: str,
    temporal_groups: int | None,
    query_shape: Sequence[int],
    key_shape: Sequence[int],
) -> AttentionProblems:
    """How one clip's (T, H, W) queries and (Tk, Hk, Wk) keys split into attention problems.

    ``spacetime``: 1 problem of T·H·W queries and Tk·Hk·Wk keys (Eq. 1); with
    ``temporal_groups=k``: T/k problems of k·H·W queries, each seeing the keys of its frames;
    ``space``: T problems of H·W queries and Hk·Wk keys; ``time``: H·W problems of T queries and
    Tk keys.
    """
    # Plain arithmetic (no int()): the block calls this on traced, possibly symbolic, shapes.
    t, h, w = query_shape
    tk, hk, wk = key_shape
    if extent == "space":
        return AttentionProblems(t, h * w, hk * wk)
    if extent == "time":
        return AttentionProblems(h * w, t, tk)
    if extent != "spacetime":
        raise ValueError(f"unknown extent {extent!r}; expected one of {EXTENTS}")
    if temporal_groups:
        groups = t // temporal_groups
        return AttentionProblems(groups, temporal_groups * h * w, (tk // groups) * hk * wk)
    return AttentionProblems(1, t * h * w, tk * hk * wk)
