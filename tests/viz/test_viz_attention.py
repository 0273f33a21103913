"""Figure 3 code: index -> frame/pixel mapping, arrows from a hand-built attention matrix, dense
weights for every extent (checked by recomputing the block's output), and rendered PNGs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nlnet.block import NonLocalBlock
from nlnet.viz.attention import (
    QUERY_COLOURS,
    AttentionGrid,
    attention_arrows,
    capture_attention,
    dense_attention,
    display_weights,
    draw_attention_arrows,
    draw_attention_heatmap,
    figure_size,
    find_nonlocal_blocks,
    heatmap_frames,
    pick_queries,
)

# Queries on a (4, 4, 6) grid, keys pooled 2x2x2 -> (2, 2, 3), clip 8 x 16 x 24: every query
# cell is 2 frames x 4 x 4 pixels, every key cell 4 frames x 8 x 8 pixels.
GRID = AttentionGrid((4, 4, 6), (2, 2, 3), (8, 16, 24), (2, 2, 2))


def _centre(lo: int, n: int) -> float:
    return float(np.mean(np.arange(lo, lo + n)))  # centre of pixels lo .. lo+n-1


def test_key_index_to_frame_and_pixel() -> None:
    for j in range(GRID.num_keys):
        tk, hk, wk = j // 6, (j // 3) % 2, j % 3  # row-major (Tk, Hk, Wk)
        frame, y, x = GRID.key_pixel(j)
        frames = range(4 * tk, 4 * tk + 4)  # clip frames this key pools
        assert frame in frames and frame == 4 * tk + 1  # the middle one (rounded down)
        assert y == _centre(8 * hk, 8) and x == _centre(8 * wk, 8)
    assert list(GRID.key_frames()) == [1] * 6 + [5] * 6


def test_query_index_round_trip() -> None:
    for i in range(GRID.num_queries):
        t, h, w = i // 24, (i // 6) % 4, i % 6
        frame, y, x = GRID.query_pixel(i)
        assert frame == 2 * t and y == _centre(4 * h, 4) and x == _centre(4 * w, 4)
        assert GRID.query_index(frame, y, x) == i
        # Any pixel of the cell maps back to it.
        assert GRID.query_index(2 * t + 1, 4 * h + 3, 4 * w) == i
    with pytest.raises(ValueError, match="outside the clip"):
        GRID.query_index(8, 0, 0)


def test_identity_grid_and_for_block() -> None:
    block = NonLocalBlock(8, subsample=(1, 2, 2))
    grid = AttentionGrid.for_block(block, (8, 8, 8), (8, 32, 32))
    assert grid.key_shape == (8, 4, 4) and grid.subsample == (1, 2, 2)
    # Key (t, 1, 2) pools query cells rows 2-3, cols 4-5 = pixels 8..15 x 16..23 of frame t.
    assert grid.key_pixel(3 * 16 + 1 * 4 + 2) == (3, 11.5, 19.5)
    flat = AttentionGrid((3, 5, 5), (3, 5, 5), (3, 5, 5))
    assert flat.subsample == (1, 1, 1)
    assert all(flat.key_pixel(j) == flat.query_pixel(j) for j in range(75))
    with pytest.raises(ValueError, match="exceed"):
        AttentionGrid((4, 4, 4), (4, 4, 4), (4, 4, 4), (1, 2, 1))


def test_arrows_from_hand_built_matrix() -> None:
    a = np.full((GRID.num_queries, GRID.num_keys), 0.01)
    q = GRID.query_index(6, 5.0, 20.0)  # frame 6, cell (3, 1, 5)
    a[q] = 0.0
    a[q, [7, 2, 11]] = [0.5, 0.3, 0.2]  # keys (1,0,1) (0,0,2) (1,1,2)
    arrows = attention_arrows(a, GRID, [q], top_k=20)[0]
    assert [ar.key_index for ar in arrows] == [7, 2, 11]  # only positive weights, strongest first
    assert [ar.key for ar in arrows] == [(5, 3.5, 11.5), (1, 3.5, 19.5), (5, 11.5, 19.5)]
    assert all(ar.query == (6, 5.5, 21.5) for ar in arrows)
    assert [ar.weight for ar in arrows] == pytest.approx([0.5, 0.3, 0.2])
    # top_k cuts; restricting to shown frames drops keys elsewhere.
    assert [ar.key_index for ar in attention_arrows(a, GRID, [q], top_k=2)[0]] == [7, 2]
    assert [ar.key_index for ar in attention_arrows(a, GRID, [q], frames=[1, 6])[0]] == [2]
    with pytest.raises(ValueError, match=r"\(Nq, Nk\)"):
        attention_arrows(a[:, :5], GRID, [q])


def test_display_weights_all_forms() -> None:
    np.testing.assert_allclose(display_weights(np.array([0.2, 0.5, 0.3])), [0.2, 0.5, 0.3])
    # Dot product: f/N may be negative and sums to anything.
    np.testing.assert_allclose(display_weights(np.array([-1.0, 0.5, 1.5, 0.0])), [0, 0.25, 0.75, 0])
    np.testing.assert_allclose(display_weights(np.array([-1.0, -2.0])), [0, 0])


@pytest.mark.parametrize(
    ("extent", "groups", "subsample"),
    [
        ("spacetime", None, (1, 2, 2)),
        ("spacetime", None, (2, 2, 2)),
        ("spacetime", 2, (1, 2, 2)),
        ("spacetime", 4, (2, 2, 2)),
        ("space", None, (1, 2, 2)),
        ("time", None, (1, 2, 2)),
        ("time", None, (2, 2, 2)),
    ],
)
@pytest.mark.parametrize("pairwise", ["embedded_gaussian", "dot_product"])
def test_dense_attention_reproduces_block_output(
    extent: str, groups: int | None, subsample: tuple, pairwise: str
) -> None:
    """y_i = Σ_j w_ij g(x̂_j): the dense matrix in global (T,H,W) order must give the block's z."""
    torch.manual_seed(0)
    block = NonLocalBlock(
        6, pairwise=pairwise, extent=extent, temporal_groups=groups, subsample=subsample,
        norm=None, zero_init=False, init_std=0.3,
    ).double()  # fmt: skip
    x = torch.randn(2, 6, 4, 5, 6, dtype=torch.float64)
    z, w = block(x, return_attention=True)
    grid = AttentionGrid.for_block(block, x.shape[2:], (8, 10, 12))
    g = block.g(F.max_pool3d(x, subsample, subsample))  # values on the pooled grid
    for b in range(2):
        dense = dense_attention(w, grid, extent=extent, temporal_groups=groups, batch_index=b)
        assert dense.shape == (grid.num_queries, grid.num_keys)
        y = dense @ g[b].flatten(1).T  # (Nq, inner)
        y = y.T.reshape(1, -1, *x.shape[2:])
        torch.testing.assert_close(block.out(y)[0] + x[b], z[b])


def test_dense_attention_errors() -> None:
    with pytest.raises(ValueError, match="do not match"):
        dense_attention(torch.rand(1, 5, 5), GRID)
    with pytest.raises(ValueError, match="unknown extent"):
        dense_attention(torch.rand(1, 96, 12), GRID, extent="global")
    with pytest.raises(IndexError, match="batch_index"):
        dense_attention(torch.rand(1, 96, 12), GRID, batch_index=1)


class _Net(torch.nn.Module):
    def __init__(self, pairwise: str) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, (1, 2, 2), stride=(1, 2, 2))
        self.nl = NonLocalBlock(8, pairwise=pairwise, zero_init=False)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.nl(self.conv(x)).mean((2, 3, 4)))


@pytest.mark.parametrize(
    "pairwise", ["gaussian", "embedded_gaussian", "dot_product", "concatenation"]
)
def test_capture_attention(pairwise: str) -> None:
    torch.manual_seed(1)
    net = _Net(pairwise).train()
    clip = torch.randn(2, 3, 4, 16, 16)
    cap = capture_attention(net, clip, batch_index=1)
    assert net.training and "forward" not in vars(net.nl)  # model left as it was
    assert cap.name == "nl" and list(find_nonlocal_blocks(net)) == ["nl"]
    assert cap.grid.query_shape == (4, 8, 8) and cap.grid.key_shape == (4, 4, 4)
    assert cap.grid.clip_shape == (4, 16, 16)
    net.eval()
    _, ref = net.nl(net.conv(clip), return_attention=True)
    torch.testing.assert_close(cap.weights, ref[1])
    torch.testing.assert_close(cap.output, net(clip))
    for q in range(0, cap.grid.num_queries, 37):
        shown = display_weights(cap.weights[q])
        assert shown.min() >= 0 and (shown.sum() == pytest.approx(1.0) or shown.sum() == 0)
    with pytest.raises(ValueError, match="unknown block 'res3'"):
        capture_attention(net, clip, block="res3")
    with pytest.raises(ValueError, match="no NonLocalBlock"):
        capture_attention(torch.nn.Conv3d(3, 3, 1), clip)


def test_pick_queries() -> None:
    a = np.full((GRID.num_queries, GRID.num_keys), 1.0 / GRID.num_keys)
    a[:, 7] += 1.0  # everybody looks at key 7 = cell (1, 0, 1): frames 4-7, pixels 0-7 x 8-15
    a[:, 0] += 0.5
    picks = pick_queries(a, GRID, n=2, strategy="attended")
    assert GRID.key_pixel(7)[0] == 5
    assert [GRID.query_cell(p) for p in picks] == [(2, 0, 2), (0, 0, 0)]
    peaked = np.full_like(a, 1.0 / GRID.num_keys)
    peaked[17] = 0
    peaked[17, 3] = 1.0
    assert pick_queries(peaked, GRID, n=1, strategy="peaked") == [17]
    with pytest.raises(ValueError, match="unknown strategy"):
        pick_queries(a, GRID, strategy="random")


def _png(path) -> Image.Image:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(path)
    img.load()
    return img


def test_arrows_png(tmp_path) -> None:
    frames = np.zeros((8, 16, 24, 3), np.uint8)
    a = np.zeros((GRID.num_queries, GRID.num_keys))
    q = GRID.query_index(0, 5, 5)  # frame 0, centre (5.5, 5.5)
    a[q, 9] = 1.0  # key (1, 1, 0): frame 5, centre (11.5, 3.5)
    out = draw_attention_arrows(frames, a, GRID, [q], tmp_path / "fig" / "arrows.png", scale=4)
    img = np.asarray(_png(out).convert("RGB"))
    gap = 2
    assert (img.shape[1], img.shape[0]) == figure_size((16, 8 * 24 + 7 * gap), 4)
    assert img.shape[:2] == (16 * 4, (8 * 24 + 7 * gap) * 4)
    # The arrow's middle, in canvas pixels, is red (the first query colour); a far pixel is black.
    start = np.array([5.5, 5.5])
    end = np.array([11.5, 3.5 + 5 * (24 + gap)])
    mid = ((start + end) / 2 + 0.5) * 4
    red = tuple(int(QUERY_COLOURS[0][i : i + 2], 16) for i in (1, 3, 5))
    patch = img[int(mid[0]) - 2 : int(mid[0]) + 3, int(mid[1]) - 2 : int(mid[1]) + 3].reshape(-1, 3)
    dist = np.abs(patch.astype(int) - red).sum(1).min()
    assert dist < 60, patch
    assert img[60, 700].tolist() == [0, 0, 0]
    # Gaps between frames are grey.
    assert img[30, 24 * 4 + 2].tolist() == [128, 128, 128]


def test_heatmap(tmp_path) -> None:
    frames = np.full((8, 16, 24, 3), 0.5)
    a = np.zeros((GRID.num_queries, GRID.num_keys))
    queries = [GRID.query_index(0, 0, 0), GRID.query_index(4, 8, 8)]
    a[queries[0], 9] = 1.0  # frame span 4-7, rows 8-15, cols 0-7
    a[queries[1], 2] = 0.7
    a[queries[1], 8] = 0.3
    heat = heatmap_frames(a[queries[0]], GRID, list(range(8)))
    assert heat.shape == (8, 16, 24)
    expected = np.zeros((8, 16, 24))
    expected[4:8, 8:16, 0:8] = 1.0  # every frame the key pools, every pixel it pools
    np.testing.assert_array_equal(heat, expected)
    shown = [0, 4]
    out = draw_attention_heatmap(
        frames, a, GRID, queries, tmp_path / "heat.png", shown_frames=shown, scale=3
    )
    img = np.asarray(_png(out).convert("RGB")).astype(int)
    assert (img.shape[1], img.shape[0]) == figure_size((2 * 16 + 2, 2 * 24 + 2), 3)
    # Row 0 (query 0): frame 4 (second panel) is hot at rows 8-15, cols 0-7, dark elsewhere.
    hot = img[12 * 3, (26 + 4) * 3]
    cold = img[4 * 3, (26 + 20) * 3]
    assert hot.sum() > cold.sum() + 200
    with pytest.raises(ValueError, match="not among"):
        draw_attention_heatmap(
            frames, a, GRID, [GRID.query_index(3, 0, 0)], tmp_path / "x.png", shown_frames=shown
        )


def test_drawing_errors(tmp_path) -> None:
    a = np.zeros((GRID.num_queries, GRID.num_keys))
    with pytest.raises(ValueError, match="clip_shape"):
        draw_attention_arrows(np.zeros((8, 16, 16, 3)), a, GRID, [0], tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        draw_attention_arrows(np.full((8, 16, 24, 3), 2.0), a, GRID, [0], tmp_path / "a.png")
    with pytest.raises(ValueError, match="distinct"):
        draw_attention_arrows(
            np.zeros((8, 16, 24, 3)), a, GRID, [0], tmp_path / "a.png", shown_frames=[1, 1]
        )
    assert not list(tmp_path.iterdir())  # nothing half-written
