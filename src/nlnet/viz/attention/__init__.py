"""Figure 3 of the paper: where a non-local block looks, drawn on the clip's frames.

Figure 3 draws, for a query position x_i of a trained block, arrows to the 20 key positions x_j
with the highest weight f(x_i, x_j)/C(x) (Eq. 1) over all frames of the clip.  This package
does that for any :class:`~nlnet.block.NonLocalBlock`:

* :mod:`.grid` — :class:`AttentionGrid` (query and sub-sampled key indices → clip frames and
  pixels) and :func:`dense_attention` (a block's returned weights → one (Nq, Nk) matrix a clip);
* :mod:`.arrows` — :func:`display_weights` (rows comparable across pairwise forms: clipped at 0,
  summing to 1), :func:`attention_arrows` (the top-k keys of a query), :func:`pick_queries`;
* :mod:`.draw` — :func:`draw_attention_arrows` (the figure) and :func:`draw_attention_heatmap`;
* :mod:`.capture` — :func:`capture_attention` runs a model and keeps one block's weights.

All drawing functions are pure (frames and weights in, PNG out) and write atomically.
"""

from nlnet.viz.attention.arrows import Arrow, attention_arrows, display_weights, pick_queries
from nlnet.viz.attention.capture import CapturedAttention, capture_attention, find_nonlocal_blocks
from nlnet.viz.attention.draw import (
    GAP_GREY,
    QUERY_COLOURS,
    draw_attention_arrows,
    draw_attention_heatmap,
    figure_size,
    heatmap_frames,
)
from nlnet.viz.attention.grid import AttentionGrid, Pixel, Shape3, dense_attention

__all__ = [
    "GAP_GREY",
    "QUERY_COLOURS",
    "Arrow",
    "AttentionGrid",
    "CapturedAttention",
    "Pixel",
    "Shape3",
    "attention_arrows",
    "capture_attention",
    "dense_attention",
    "display_weights",
    "draw_attention_arrows",
    "draw_attention_heatmap",
    "figure_size",
    "find_nonlocal_blocks",
    "heatmap_frames",
    "pick_queries",
]
