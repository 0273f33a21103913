"""Where a block's queries and keys lie in the clip, and its weights as one (Nq, Nk) matrix.

:class:`AttentionGrid` maps query and (sub-sampled) key indices to clip frames and pixels; queries
live on the block's input grid (T, H, W), keys on the pooled grid (Tk, Hk, Wk) of §3.3's
sub-sampling, each key covering ``subsample`` query cells.  :func:`dense_attention` turns the
weights a block returns, laid out per ``extent`` / ``temporal_groups``
(:func:`nlnet.geometry.attention_problems`), into one matrix per clip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from nlnet.block import NonLocalBlock
from nlnet.geometry import attention_problems, key_shape

Shape3 = tuple[int, int, int]
Pixel = tuple[int, float, float]  # (frame, y, x); pixel centres at integer coordinates


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
