"""Figure 3's arrows: display weights, the top-k keys of a query, and automatic query picks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from nlnet.viz.attention.grid import AttentionGrid, Pixel, _check_index


def display_weights(row: Tensor | np.ndarray) -> np.ndarray:
    """A row f(x_i, ·)/C(x_i) made comparable across pairwise forms (clip at 0, sum to 1).

    Softmax rows are unchanged; dot-product and concatenation rows (which sum to anything, and
    dot products may be negative) are clipped at 0 and rescaled to sum to 1.  A negative
    dot-product weight *subtracts* g(x_j); it is drawn as no attention.
    """
    w = np.asarray(row.detach().cpu() if isinstance(row, Tensor) else row, dtype=np.float64)
    if w.ndim != 1:
        raise ValueError(f"expected one row of weights (Nk,), got shape {w.shape}")
    w = np.clip(w, 0.0, None)
    total = w.sum()
    return w / total if total > 0 else w


@dataclass(frozen=True)
class Arrow:
    """One arrow of Figure 3: from a query to one of its top-k keys."""

    query_index: int
    key_index: int
    query: Pixel
    key: Pixel
    weight: float  # display weight (see display_weights)
    raw_weight: float  # f/C as the block computed it


def _as_matrix(weights: Tensor | np.ndarray, grid: AttentionGrid) -> np.ndarray:
    a = np.asarray(
        weights.detach().cpu().double() if isinstance(weights, Tensor) else weights,
        dtype=np.float64,
    )
    if a.shape != (grid.num_queries, grid.num_keys):
        raise ValueError(
            f"attention matrix must be (Nq, Nk) = ({grid.num_queries}, {grid.num_keys}) for "
            f"grid {grid.query_shape}->{grid.key_shape}, got {a.shape}; use dense_attention() "
            "on a block's raw weights first"
        )
    return a


def attention_arrows(
    weights: Tensor | np.ndarray,
    grid: AttentionGrid,
    queries: Sequence[int],
    *,
    top_k: int = 20,
    frames: Sequence[int] | None = None,
) -> list[list[Arrow]]:
    """The top-``top_k`` arrows of each query (Figure 3), strongest first.

    ``frames`` restricts keys to those clip frames (the figure shows only those); default all.
    """
    a = _as_matrix(weights, grid)
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    allowed = np.ones(grid.num_keys, dtype=bool)
    if frames is not None:
        allowed = np.isin(grid.key_frames(), np.asarray(list(frames)))
    out = []
    for q in queries:
        _check_index("query", int(q), grid.num_queries)
        shown = display_weights(a[q])
        order = np.argsort(-np.where(allowed, shown, -np.inf), kind="stable")
        order = [int(j) for j in order[:top_k] if allowed[j] and shown[j] > 0]
        qpix = grid.query_pixel(int(q))
        out.append(
            [
                Arrow(int(q), j, qpix, grid.key_pixel(j), float(shown[j]), float(a[q, j]))
                for j in order
            ]
        )
    return out


def pick_queries(
    weights: Tensor | np.ndarray,
    grid: AttentionGrid,
    n: int = 3,
    *,
    strategy: str = "attended",
    frames: Sequence[int] | None = None,
) -> list[int]:
    """Choose ``n`` query positions automatically, in distinct frames/places when possible.

    ``attended``: queries lying in the key cells that receive the most attention summed over
    all queries (where the block looks most, e.g. on the objects); ``peaked``: queries whose
    own attention is most concentrated (largest top weight).
    """
    a = _as_matrix(weights, grid)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rows = np.stack([display_weights(r) for r in a])
    q_frames = np.array([grid.query_pixel(i)[0] for i in range(grid.num_queries)])
    ok = np.ones(grid.num_queries, bool) if frames is None else np.isin(q_frames, list(frames))
    if strategy == "peaked":
        score = rows.max(axis=1)
    elif strategy == "attended":
        received = rows.sum(axis=0)  # attention each key receives
        # A query scores what its own position receives as a key (via the key cell pooling it).
        (t, h, w), (tk, hk, wk) = grid.query_shape, grid.key_shape
        assert grid.subsample is not None
        st, sh, sw = grid.subsample
        ti = np.minimum(np.arange(t) // st, tk - 1)
        hi = np.minimum(np.arange(h) // sh, hk - 1)
        wi = np.minimum(np.arange(w) // sw, wk - 1)
        kidx = (ti[:, None, None] * hk + hi[None, :, None]) * wk + wi[None, None, :]
        score = received[kidx.reshape(-1)]
    else:
        raise ValueError(f"unknown strategy {strategy!r}; expected 'attended' or 'peaked'")
    score = np.where(ok, score, -np.inf)
    chosen: list[int] = []
    taken_cells: set[tuple[int, int, int]] = set()
    for q in np.argsort(-score, kind="stable"):
        if not np.isfinite(score[q]):
            break
        # Skip queries in a key cell already used, so picks spread over distinct places.
        t_, h_, w_ = grid.query_cell(int(q))
        cell = (t_ // grid.subsample[0], h_ // grid.subsample[1], w_ // grid.subsample[2])
        if cell in taken_cells:
            continue
        taken_cells.add(cell)
        chosen.append(int(q))
        if len(chosen) == n:
            break
    return chosen
