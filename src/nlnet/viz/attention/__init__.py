"""Figure 3 of the paper: where a non-local block looks, drawn on the clip's frames.

Figure 3 draws, for a query position x_i of a trained block, arrows to the 20 key positions x_j
with the highest weight f(x_i, x_j)/C(x) (Eq. 1) over all frames of the clip.  This package
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

from nlnet.viz.attention.arrows import Arrow, attention_arrows, display_weights, pick_queries
from nlnet.viz.attention.capture import CapturedAttention, capture_attention, nonlocal_blocks
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
    "heatmap_frames",
    "nonlocal_blocks",
    "pick_queries",
]
