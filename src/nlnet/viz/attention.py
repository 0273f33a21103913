"""Figure 3 of the paper: where a non-local block looks, drawn on the clip's frames.

Figure 3 draws, for a query position x_i of a trained block, arrows to the 20 key positions x_j
with the highest weight f(x_i, x_j)/C(x) (Eq. 1) over all frames of the clip.  This module
does that for any :class:`~nlnet.block.NonLocalBlock`:

* :class:`AttentionGrid` maps query and (sub-sampled) key indices to clip frames and pixels.
  Queries live on the block's input grid (T, H, W); keys on the pooled grid (Tk, Hk, Wk), each
  key cell covering ``subsample`` query cells (§3.3's sub-sampling, x̂ = max-pool(x)); the
  query grid covers the whole clip (T_clip, H_img, W_img), so one key maps to the centre of the
  pixels it pools from, in the frame in the middle of its temporal span.
* :func:`dense_attention` turns what ``NonLocalBlock.forward(x, return_attention=True)``
  returns — (B', Nq', Nk') weights laid out per ``extent`` / ``temporal_groups`` — into one
  (Nq, Nk) matrix per clip, with zeros where a query cannot see a key.
* :func:`display_weights` makes rows comparable across pairwise forms: softmax rows (Gaussian,
  embedded Gaussian) already sum to 1; dot-product rows (f/N, possibly negative) and
  concatenation rows (ReLU(·)/N) are clipped at 0 and rescaled to sum to 1.  A negative
  dot-product weight *subtracts* g(x_j); it is drawn as no attention.
* :func:`attention_arrows` / :func:`draw_attention_arrows` — the arrows figure;
  :func:`draw_attention_heatmap` — one row of frames per query with the weights as a heat map.
* :func:`capture_attention` runs a model on a clip and returns the weights of one named block.

All drawing functions are pure (frames and weights in, PNG out) and write atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nlnet.block import NonLocalBlock
from nlnet.geometry import attention_problems, key_shape
from nlnet.io import atomic_write

Shape3 = tuple[int, int, int]
Pixel = tuple[int, float, float]  # (frame, y, x); pixel centres at integer coordinates

# Arrow / marker colours, one per query (matplotlib's "tab10" without grey).
QUERY_COLOURS: tuple[str, ...] = (
    "#ff3b30",
    "#34c759",
    "#0a84ff",
    "#ffcc00",
    "#af52de",
    "#ff9500",
    "#5ac8fa",
    "#ff2d55",
)


def _shape3(name: str, value: Sequence[int]) -> Shape3:
    t = tuple(int(v) for v in value)
    if len(t) != 3 or any(v < 1 for v in t):
        raise ValueError(f"{name} must be 3 positive ints (T, H, W), got {tuple(value)!r}")
    return (t[0], t[1], t[2])


@dataclass(frozen=True)
class AttentionGrid:
    """How one block's query and key indices map to the clip (row-major (T, H, W) order).

    Args:
        query_shape: (T, H, W) of the block's input (the queries).
        key_shape: (Tk, Hk, Wk) of the sub-sampled keys.
        clip_shape: (T_clip, H_img, W_img) of the clip the network saw.
        subsample: the block's pooling kernel (kT, kH, kW); default ``query // key`` per axis.
    """

    query_shape: Shape3
    key_shape: Shape3
    clip_shape: Shape3
    subsample: Shape3 | None = None

    def __post_init__(self) -> None:
        q = _shape3("query_shape", self.query_shape)
        k = _shape3("key_shape", self.key_shape)
        c = _shape3("clip_shape", self.clip_shape)
        object.__setattr__(self, "query_shape", q)
        object.__setattr__(self, "key_shape", k)
        object.__setattr__(self, "clip_shape", c)
        if self.subsample is None:
            object.__setattr__(self, "subsample", tuple(a // b for a, b in zip(q, k)))
        s = _shape3("subsample", self.subsample)  # type: ignore[arg-type]
        object.__setattr__(self, "subsample", s)
        for axis, qa, ka, sa in zip("THW", q, k, s):
            if ka * sa > qa:
                raise ValueError(
                    f"key axis {axis}: {ka} key cells × kernel {sa} exceed the {qa} query cells "
                    f"(query_shape={q}, key_shape={k}, subsample={s})"
                )

    @classmethod
    def for_block(
        cls, block: NonLocalBlock, query_shape: Sequence[int], clip_shape: Sequence[int]
    ) -> AttentionGrid:
        """The grid of a (3D) block for an input of spatial-temporal shape ``query_shape``."""
        if block.dim != 3:
            raise ValueError(f"attention figures need a video block (dim=3), got dim={block.dim}")
        q = _shape3("query_shape", query_shape)
        kernel = _shape3("subsample", block.subsample or (1, 1, 1))
        return cls(q, key_shape(q, kernel), _shape3("clip_shape", clip_shape), kernel)

    @property
    def num_queries(self) -> int:
        return math.prod(self.query_shape)

    @property
    def num_keys(self) -> int:
        return math.prod(self.key_shape)

    # -- index <-> clip coordinates -------------------------------------------------------------
    def _to_pixel(self, cell: Shape3, span: Shape3) -> Pixel:
        """Centre of query cells [cell·span, cell·span + span) in clip pixel coordinates."""
        (tq, hq, wq), (tc, hc, wc) = self.query_shape, self.clip_shape
        t0, h0, w0 = (c * s for c, s in zip(cell, span))
        # Frame: the middle of the clip frames the cells cover (floor, so T = T_clip is exact).
        mid_t = (t0 + span[0] / 2) * tc / tq - 0.5
        frame = min(max(math.floor(mid_t + 1e-9), 0), tc - 1)
        y = (h0 + span[1] / 2) * hc / hq - 0.5
        x = (w0 + span[2] / 2) * wc / wq - 0.5
        return frame, y, x

    def query_cell(self, index: int) -> Shape3:
        _check_index("query", index, self.num_queries)
        _, h, w = self.query_shape
        return (index // (h * w), (index // w) % h, index % w)

    def key_cell(self, index: int) -> Shape3:
        _check_index("key", index, self.num_keys)
        _, h, w = self.key_shape
        return (index // (h * w), (index // w) % h, index % w)

    def query_pixel(self, index: int) -> Pixel:
        """(frame, y, x) of query ``index`` in the clip."""
        return self._to_pixel(self.query_cell(index), (1, 1, 1))

    def key_pixel(self, index: int) -> Pixel:
        """(frame, y, x) of (sub-sampled) key ``index``: centre of the pixels it pools."""
        assert self.subsample is not None
        return self._to_pixel(self.key_cell(index), self.subsample)

    def query_index(self, frame: int, y: float, x: float) -> int:
        """The query whose cell contains clip pixel (frame, y, x)."""
        (tq, hq, wq), (tc, hc, wc) = self.query_shape, self.clip_shape
        if not (0 <= frame < tc and -0.5 <= y < hc - 0.5 and -0.5 <= x < wc - 0.5):
            raise ValueError(
                f"query pixel (frame={frame}, y={y}, x={x}) is outside the clip {self.clip_shape}"
            )
        t = min(int(frame * tq // tc), tq - 1)
        h = min(int((y + 0.5) * hq // hc), hq - 1)
        w = min(int((x + 0.5) * wq // wc), wq - 1)
        return (t * hq + h) * wq + w

    def key_frames(self) -> np.ndarray:
        """Clip frame of every key index, shape (Nk,)."""
        tk, hk, wk = self.key_shape
        frames = [self.key_pixel(t * hk * wk)[0] for t in range(tk)]
        return np.repeat(np.asarray(frames), hk * wk)


def _check_index(kind: str, index: int, n: int) -> None:
    if not 0 <= index < n:
        raise IndexError(f"{kind} index {index} out of range for {n} {kind} positions")


# -- weights ---------------------------------------------------------------------------------
def dense_attention(
    weights: Tensor,
    grid: AttentionGrid,
    *,
    extent: str = "spacetime",
    temporal_groups: int | None = None,
    batch_index: int = 0,
) -> Tensor:
    """One clip's (Nq, Nk) attention matrix from a block's returned weights.

    ``weights`` is what ``NonLocalBlock.forward(x, return_attention=True)`` returns (see its
    docstring): (B, Nq, Nk) for ``spacetime``; (B·T/k, k·H·W, k'·Hk·Wk) with
    ``temporal_groups=k``; (B·T, H·W, Hk·Wk) for ``space``; (B·H·W, T, Tk) for ``time``.
    Entries a query cannot see are 0.
    """
    if weights.dim() != 3:
        raise ValueError(f"weights must be (B', Nq', Nk'), got shape {tuple(weights.shape)}")
    (t, h, w), (tk, hk, wk) = grid.query_shape, grid.key_shape
    nq, nk = grid.num_queries, grid.num_keys
    assert grid.subsample is not None
    per_clip, nq_clip, nk_clip = attention_problems(
        extent, temporal_groups, grid.query_shape, grid.key_shape
    )
    expected = (nq_clip, nk_clip)
    if weights.shape[0] % per_clip or tuple(weights.shape[1:]) != expected:
        raise ValueError(
            f"weights of shape {tuple(weights.shape)} do not match extent={extent!r}, "
            f"temporal_groups={temporal_groups} and grid {grid.query_shape}->{grid.key_shape}: "
            f"expected (B·{per_clip}, {expected[0]}, {expected[1]})"
        )
    b = weights.shape[0] // per_clip
    if not 0 <= batch_index < b:
        raise IndexError(f"batch_index {batch_index} out of range for a batch of {b}")
    part = weights[batch_index * per_clip : (batch_index + 1) * per_clip]
    if per_clip == 1:
        return part[0]
    out = weights.new_zeros(nq, nk)
    q_ids = torch.arange(nq).reshape(t, h, w)
    k_ids = torch.arange(nk).reshape(tk, hk, wk)
    if extent == "spacetime":  # temporal groups: block-diagonal over groups of frames
        k, kg = t // per_clip, tk // per_clip
        for gi in range(per_clip):
            qi = q_ids[gi * k : (gi + 1) * k].reshape(-1)
            ki = k_ids[gi * kg : (gi + 1) * kg].reshape(-1)
            out[qi[:, None], ki[None, :]] = part[gi]
    elif extent == "space":  # frame t's queries see frame t's keys (kT = 1)
        for ti in range(t):
            out[q_ids[ti].reshape(-1)[:, None], k_ids[ti].reshape(-1)[None, :]] = part[ti]
    else:  # time: query (·, h, w) sees the key cell that pooled (h, w), in every frame
        sh, sw = grid.subsample[1], grid.subsample[2]
        for hi in range(h):
            for wi in range(w):
                kh, kw = min(hi // sh, hk - 1), min(wi // sw, wk - 1)
                out[q_ids[:, hi, wi][:, None], k_ids[:, kh, kw][None, :]] = part[hi * w + wi]
    return out


def display_weights(row: Tensor | np.ndarray) -> np.ndarray:
    """A row f(x_i, ·)/C(x_i) made comparable across pairwise forms (clip at 0, sum to 1).

    Softmax rows are unchanged; dot-product and concatenation rows (which sum to anything, and
    dot products may be negative) are clipped at 0 and rescaled to sum to 1.
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


# -- drawing ---------------------------------------------------------------------------------
def _frames_uint8(frames: Tensor | np.ndarray) -> np.ndarray:
    f = frames.detach().cpu().numpy() if isinstance(frames, Tensor) else np.asarray(frames)
    if f.ndim != 4 or f.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) RGB, got shape {f.shape}")
    if f.dtype != np.uint8:
        if f.min() < -1e-6 or f.max() > 1 + 1e-6:
            raise ValueError(
                f"float frames must lie in [0, 1] (got range [{f.min():.3g}, {f.max():.3g}]); "
                "undo the dataset normalisation first"
            )
        f = np.round(np.clip(f, 0, 1) * 255).astype(np.uint8)
    return f


GAP_GREY = 128  # between frames: mid grey, distinct from black and white content


def _canvas(frames: np.ndarray, shown: Sequence[int] | range, gap: int) -> np.ndarray:
    _, h, w, _ = frames.shape
    canvas = np.full((h, len(shown) * w + (len(shown) - 1) * gap, 3), GAP_GREY, np.uint8)
    for p, f in enumerate(shown):
        canvas[:, p * (w + gap) : p * (w + gap) + w] = frames[f]
    return canvas


def _shown_frames(frames: np.ndarray, shown: Sequence[int] | None, grid: AttentionGrid) -> list:
    t = frames.shape[0]
    if (t, *frames.shape[1:3]) != grid.clip_shape:
        raise ValueError(
            f"frames {frames.shape[:3]} do not match the grid's clip_shape {grid.clip_shape}"
        )
    shown = list(range(t)) if shown is None else [int(f) for f in shown]
    if not shown or any(not 0 <= f < t for f in shown) or len(set(shown)) != len(shown):
        raise ValueError(f"frames to show must be distinct indices in 0..{t - 1}, got {shown}")
    return shown


def _save(fig: Any, out: str | os.PathLike[str], dpi: int) -> Path:
    out = Path(out)
    with atomic_write(out) as fh:
        fig.savefig(fh, dpi=dpi, format="png")
    return out


def figure_size(canvas_hw: tuple[int, int], scale: int) -> tuple[int, int]:
    """PNG (width, height) in pixels of a figure whose canvas is ``canvas_hw`` frame pixels."""
    return canvas_hw[1] * scale, canvas_hw[0] * scale


def draw_attention_arrows(
    frames: Tensor | np.ndarray,
    weights: Tensor | np.ndarray,
    grid: AttentionGrid,
    queries: Sequence[int],
    out: str | os.PathLike[str],
    *,
    top_k: int = 20,
    shown_frames: Sequence[int] | None = None,
    scale: int | None = None,
    gap: int = 2,
) -> Path:
    """Draw Figure 3: the frames side by side, arrows from each query to its top-k keys.

    Args:
        frames: the clip as (T_clip, H, W, 3), uint8 or floats in [0, 1].
        weights: the clip's (Nq, Nk) attention (see :func:`dense_attention`).
        grid: maps indices to pixels.
        queries: query indices (e.g. :meth:`AttentionGrid.query_index` or :func:`pick_queries`).
        out: PNG path.
        top_k: arrows per query (Figure 3 uses 20).
        shown_frames: which clip frames to draw (default all); keys elsewhere are not drawn.
        scale: output pixels per frame pixel (default: frames at least 128 px wide).
        gap: grey frame pixels between frames.

    Arrow opacity is the key's display weight relative to the query's strongest key; each
    query has its own colour and is marked with a ring.  The PNG is exactly
    :func:`figure_size` ((H, n·W + (n−1)·gap), scale) pixels.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle, FancyArrowPatch

    f = _frames_uint8(frames)
    shown = _shown_frames(f, shown_frames, grid)
    w = f.shape[2]
    scale = scale or max(1, math.ceil(128 / w))
    arrows = attention_arrows(weights, grid, queries, top_k=top_k, frames=shown)
    canvas = _canvas(f, shown, gap)
    dpi = 100
    width, height = figure_size(canvas.shape[:2], scale)
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    try:
        ax = fig.add_axes((0, 0, 1, 1))
        ax.imshow(canvas, interpolation="nearest")
        ax.set_xlim(-0.5, canvas.shape[1] - 0.5)
        ax.set_ylim(canvas.shape[0] - 0.5, -0.5)
        ax.axis("off")
        offset = {fr: p * (w + gap) for p, fr in enumerate(shown)}
        for qi, (q, arrs) in enumerate(zip(queries, arrows)):
            colour = QUERY_COLOURS[qi % len(QUERY_COLOURS)]
            qf, qy, qx = grid.query_pixel(int(q))
            if qf not in offset:
                raise ValueError(f"query {q} lies in frame {qf}, which is not among {shown}")
            start = (qx + offset[qf], qy)
            top = max((a.weight for a in arrs), default=1.0) or 1.0
            for a in reversed(arrs):  # strongest drawn last (on top)
                kf, ky, kx = a.key
                # Opacity grows with the weight relative to the query's strongest key (square
                # root, so weak arrows stay visible but clearly weaker).
                alpha = 0.2 + 0.8 * math.sqrt(max(0.0, min(1.0, a.weight / top)))
                ax.add_patch(
                    FancyArrowPatch(
                        start,
                        (kx + offset[kf], ky),
                        arrowstyle="-|>",
                        mutation_scale=3 * scale,
                        linewidth=max(1.0, scale / 2.5),
                        color=colour,
                        alpha=alpha,
                        shrinkA=0,
                        shrinkB=0,
                    )
                )
            ax.add_patch(
                Circle(start, radius=1.2, fill=False, edgecolor=colour, linewidth=scale / 2.5)
            )
        return _save(fig, out, dpi)
    finally:
        plt.close(fig)


def heatmap_frames(
    weights_row: Tensor | np.ndarray, grid: AttentionGrid, shown: Sequence[int]
) -> np.ndarray:
    """A query's display weights painted on each shown clip frame: (len(shown), H_img, W_img).

    Each pixel takes the weight of the key cell that pools it.
    """
    w = display_weights(weights_row)
    if w.shape != (grid.num_keys,):
        raise ValueError(f"weights row must have Nk = {grid.num_keys} entries, got {w.shape}")
    (tq, hq, wq), (tk, hk, wk), (tc, hc, wc) = grid.query_shape, grid.key_shape, grid.clip_shape
    assert grid.subsample is not None
    st, sh, sw = grid.subsample
    keys = w.reshape(tk, hk, wk)
    rows = np.minimum((np.arange(hc) * hq // hc) // sh, hk - 1)
    cols = np.minimum((np.arange(wc) * wq // wc) // sw, wk - 1)
    out = np.zeros((len(shown), hc, wc))
    for p, f in enumerate(shown):
        # Frame f lies in query time cell t, pooled by key time cell t // kT.
        kt = min((f * tq // tc) // st, tk - 1)
        out[p] = keys[kt][rows[:, None], cols[None, :]]
    return out


def draw_attention_heatmap(
    frames: Tensor | np.ndarray,
    weights: Tensor | np.ndarray,
    grid: AttentionGrid,
    queries: Sequence[int],
    out: str | os.PathLike[str],
    *,
    shown_frames: Sequence[int] | None = None,
    scale: int | None = None,
    gap: int = 2,
) -> Path:
    """One row per query: the frames dimmed, the query's display weights as a heat map on top.

    Colour is relative to the query's largest weight; the query is marked with a ring.  The PNG
    is :func:`figure_size` of a canvas (n_q·H + (n_q−1)·gap, n·W + (n−1)·gap).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    f = _frames_uint8(frames)
    shown = _shown_frames(f, shown_frames, grid)
    a = _as_matrix(weights, grid)
    if not queries:
        raise ValueError("need at least one query to draw")
    _, h, w, _ = f.shape
    scale = scale or max(1, math.ceil(128 / w))
    cmap = plt.get_cmap("inferno")
    row_canvas = _canvas(f, shown, gap).astype(np.float64) / 255
    is_gap = np.all(_canvas(np.zeros_like(f), shown, gap) == GAP_GREY, axis=-1)
    rows = []
    for q in queries:
        heat = heatmap_frames(a[int(q)], grid, shown)
        heat = heat / heat.max() if heat.max() > 0 else heat
        heat_canvas = (
            _canvas(
                np.repeat((heat * 255).round().astype(np.uint8)[..., None], 3, axis=3),
                range(len(shown)),  # heat already holds the shown frames only
                gap,
            )[..., 0].astype(np.float64)
            / 255
        )
        coloured = cmap(heat_canvas)[..., :3]
        alpha = 0.25 + 0.75 * heat_canvas[..., None]
        blended = (1 - alpha) * (0.4 * row_canvas) + alpha * coloured
        blended[is_gap] = GAP_GREY / 255
        rows.append(blended)
    gap_row = np.full((gap, rows[0].shape[1], 3), GAP_GREY / 255)
    stacked = rows[0]
    for r in rows[1:]:
        stacked = np.concatenate([stacked, gap_row, r], axis=0)
    dpi = 100
    width, height = figure_size(stacked.shape[:2], scale)
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    try:
        ax = fig.add_axes((0, 0, 1, 1))
        ax.imshow(stacked, interpolation="nearest")
        ax.set_xlim(-0.5, stacked.shape[1] - 0.5)
        ax.set_ylim(stacked.shape[0] - 0.5, -0.5)
        ax.axis("off")
        offset = {fr: p * (w + gap) for p, fr in enumerate(shown)}
        for qi, q in enumerate(queries):
            qf, qy, qx = grid.query_pixel(int(q))
            if qf not in offset:
                raise ValueError(f"query {q} lies in frame {qf}, which is not among {shown}")
            colour = QUERY_COLOURS[qi % len(QUERY_COLOURS)]
            centre = (qx + offset[qf], qy + qi * (h + gap))
            ax.add_patch(
                Circle(centre, radius=1.5, fill=False, edgecolor=colour, linewidth=scale / 2.5)
            )
        return _save(fig, out, dpi)
    finally:
        plt.close(fig)


# -- running a model -------------------------------------------------------------------------
@dataclass
class CapturedAttention:
    """One block's attention for one clip of a forward pass."""

    name: str
    weights: Tensor  # dense (Nq, Nk) for the chosen clip, float32 on CPU
    grid: AttentionGrid
    output: Any  # the model's output (e.g. logits)


def nonlocal_blocks(model: nn.Module) -> dict[str, NonLocalBlock]:
    """The model's non-local blocks by module name (the names ``--block`` accepts)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, NonLocalBlock)}


def capture_attention(
    model: nn.Module,
    clip: Tensor,
    *,
    block: str | None = None,
    batch_index: int = 0,
) -> CapturedAttention:
    """Run ``model(clip)`` and return the attention of non-local block ``block``.

    ``clip`` is the network input (B, C, T, H, W); ``block`` a module name from
    :func:`nonlocal_blocks` (default: the first).  The block is called with
    ``return_attention=True`` for this one pass (exact weights, explicit backend) in eval mode;
    the model is left unchanged afterwards.
    """
    blocks = nonlocal_blocks(model)
    if not blocks:
        raise ValueError("the model has no NonLocalBlock: nothing to visualise")
    if block is None:
        block = next(iter(blocks))
    if block not in blocks:
        raise ValueError(f"unknown block {block!r}; the model's non-local blocks: {list(blocks)}")
    if clip.dim() != 5:
        raise ValueError(f"clip must be (B, C, T, H, W), got shape {tuple(clip.shape)}")
    target = blocks[block]
    seen: dict[str, Any] = {}
    original = target.forward

    def forward(x: Tensor, **kwargs: Any) -> Tensor:
        kwargs.pop("return_attention", None)
        z, w = original(x, return_attention=True, **kwargs)
        seen["weights"], seen["shape"] = w.detach(), tuple(x.shape[2:])
        return z

    was_training = model.training
    model.eval()  # inference statistics; restored below
    target.forward = forward  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            output = model(clip)
    finally:
        del target.forward  # back to the class's method
        model.train(was_training)
    if "weights" not in seen:
        raise RuntimeError(f"block {block!r} was not called by the model's forward pass")
    grid = AttentionGrid.for_block(target, seen["shape"], tuple(clip.shape[2:]))
    dense = dense_attention(
        seen["weights"].float().cpu(),
        grid,
        extent=target.extent,
        temporal_groups=target.temporal_groups,
        batch_index=batch_index,
    )
    return CapturedAttention(block, dense, grid, output)
