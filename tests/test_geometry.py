"""nlnet.geometry: the one description of how a block cuts a clip into attention problems,
checked against the weights the block really returns and against a plain count."""

from __future__ import annotations

import pytest
import torch

from nlnet.block import NonLocalBlock
from nlnet.geometry import attention_problems, key_shape


def test_key_shape_floors_each_axis() -> None:
    assert key_shape((8, 7, 9), (2, 2, 2)) == (4, 3, 4)
    assert key_shape((8, 7, 9), None) == (8, 7, 9)


@pytest.mark.parametrize(
    ("extent", "groups", "subsample"),
    [
        ("spacetime", None, False),
        ("spacetime", None, (2, 3, 2)),
        ("spacetime", 2, (2, 2, 2)),
        ("spacetime", 8, (1, 3, 1)),
        ("space", None, (1, 3, 2)),
        ("time", None, (4, 1, 1)),
        ("time", None, False),
    ],
)
def test_matches_the_weights_the_block_returns(extent, groups, subsample) -> None:
    torch.manual_seed(0)
    b, t, h, w = 2, 8, 6, 5
    block = NonLocalBlock(
        4, inner_channels=2, extent=extent, temporal_groups=groups, subsample=subsample
    ).double()
    x = torch.randn(b, 4, t, h, w, dtype=torch.float64)
    _, weights = block(x, return_attention=True)
    problems = attention_problems(extent, groups, (t, h, w), key_shape((t, h, w), block.subsample))
    assert tuple(weights.shape) == (b * problems.groups, problems.queries, problems.keys)
    # Every query sees exactly the keys its problem holds: groups x Nq x Nk pairs per clip.
    tk, hk, wk = key_shape((t, h, w), block.subsample)
    pairs = {"spacetime": t * h * w * tk * hk * wk // problems.groups}
    pairs.update(space=t * h * w * hk * wk, time=h * w * t * tk)
    assert problems.groups * problems.queries * problems.keys == pairs[extent]


def test_unknown_extent() -> None:
    with pytest.raises(ValueError, match="unknown extent 'local'"):
        attention_problems("local", None, (1, 1, 1), (1, 1, 1))
