"""Drawing Figure 3: arrows or heat maps over the clip's frames, written as PNG atomically."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from nlnet.io import atomic_write
from nlnet.viz.attention.arrows import _as_matrix, attention_arrows, display_weights
from nlnet.viz.attention.grid import AttentionGrid

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


_DPI = 100


def _image_figure(plt: Any, image: np.ndarray, scale: int) -> tuple[Any, Any]:
    """A figure showing ``image`` pixel for pixel, ``scale`` PNG pixels each, and its axes."""
    width, height = figure_size(image.shape[:2], scale)
    fig = plt.figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(image, interpolation="nearest")
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    ax.axis("off")
    return fig, ax


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
    fig, ax = _image_figure(plt, canvas, scale)
    try:
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
        return _save(fig, out, _DPI)
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
    fig, ax = _image_figure(plt, stacked, scale)
    try:
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
        return _save(fig, out, _DPI)
    finally:
        plt.close(fig)
