"""The "colour match" synthetic dataset: contract, determinism, balance, and labels read back
from the rendered pixels (independently of the generator's own bookkeeping)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from nlnet.data import build_dataset, list_datasets
from nlnet.data.synthetic import PALETTE, ColourMatchDataset


def _objects(clip: torch.Tensor, mean: float = 0.5, std: float = 0.5) -> list[tuple]:
    """(frame, top, left, height, width, colour index) of every non-black region, from pixels."""
    rgb = clip * std + mean  # undo the normalisation -> [0, 1]
    found = []
    for t in range(rgb.shape[1]):
        lit = rgb[:, t].abs().sum(0) > 1e-6
        if not lit.any():
            continue
        ys, xs = torch.nonzero(lit, as_tuple=True)
        top, left = int(ys.min()), int(xs.min())
        h, w = int(ys.max()) - top + 1, int(xs.max()) - left + 1
        colours = rgb[:, t, lit].T.unique(dim=0)
        assert colours.shape[0] == 1, "one object per frame, one colour"
        colour = [i for i, c in enumerate(PALETTE) if torch.allclose(colours[0], torch.tensor(c))]
        found.append((t, top, left, h, w, colour[0], int(lit.sum())))
    return found


def test_registered_and_contract() -> None:
    assert "colour_match" in list_datasets()
    ds = build_dataset("colour_match", mode="val", val_samples=6)
    assert isinstance(ds, ColourMatchDataset)
    assert (ds.num_classes, ds.multi_label, ds.classes) == (2, False, ["different", "same"])
    assert len(ds) == len(ds.videos) == 6 and len(set(ds.videos)) == 6
    for i in range(6):
        item = ds[i]
        assert set(item) == {"clip", "target", "index", "view", "valid"}
        assert item["clip"].shape == (3, 8, 32, 32) and item["clip"].dtype == torch.float32
        assert item["target"].dtype == torch.int64 and item["target"].shape == ()
        assert (item["index"], item["view"], item["valid"]) == (i, 0, True)
    # Works through the default collate of a DataLoader.
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["clip"].shape == (3, 3, 8, 32, 32) and batch["target"].tolist() == [0, 1, 0]


@pytest.mark.parametrize("split", ["train", "val"])
def test_label_matches_pixels(split: str) -> None:
    ds = ColourMatchDataset(split, num_samples=200, val_samples=200, seed=3)
    for i in range(200):
        item = ds[i]
        objs = _objects(item["clip"])
        assert len(objs) == 2, objs
        (fa, *_, ca, na), (fb, *_, cb, nb) = objs
        assert 0 <= fa <= 2 and 5 <= fb <= 7
        assert na == nb == 25 and all(o[3] == o[4] == 5 for o in objs)  # 5x5 squares
        assert int(item["target"]) == int(ca == cb) == i % 2
        spec = ds.describe(i)
        assert (spec.frame_a, spec.frame_b, spec.colour_a, spec.colour_b) == (fa, fb, ca, cb)
        assert (spec.top_left_a, spec.top_left_b) == (objs[0][1:3], objs[1][1:3])
        assert spec.centre("a") == (fa, objs[0][1] + 2, objs[0][2] + 2)


def test_background_normalisation() -> None:
    clip = ColourMatchDataset("val", val_samples=1)[0]["clip"]
    values = clip.unique()
    assert values.min() == -1.0 and values.max() <= 1.0  # (0 - 0.5) / 0.5 = -1 on black
    custom = ColourMatchDataset("val", val_samples=1, mean=0.25, std=2.0)[0]["clip"]
    torch.testing.assert_close(custom, (clip * 0.5 + 0.5 - 0.25) / 2.0)


def test_deterministic_per_seed() -> None:
    a = ColourMatchDataset("val", val_samples=20, seed=7)
    b = ColourMatchDataset("val", val_samples=20, seed=7)
    c = ColourMatchDataset("val", val_samples=20, seed=8)
    same = [torch.equal(a[i]["clip"], b[i]["clip"]) for i in range(20)]
    other = [torch.equal(a[i]["clip"], c[i]["clip"]) for i in range(20)]
    assert all(same) and sum(other) <= 1
    # Splits are different streams.
    t = ColourMatchDataset("train", num_samples=20, seed=7)
    assert sum(torch.equal(a[i]["clip"], t[i]["clip"]) for i in range(20)) <= 1


def test_seeded_draws() -> None:
    train = ColourMatchDataset("train", num_samples=10)
    x1, x2 = train[(3, 123)], train[(3, 123)]
    assert torch.equal(x1["clip"], x2["clip"])
    fresh = [train[(3, s)]["clip"] for s in range(10)]
    assert len({f.numpy().tobytes() for f in fresh}) == 10  # new clip per draw seed
    assert all(int(train[(i, 99 + i)]["target"]) == i % 2 for i in range(10))
    # The same draw seed at another index gives the same scene with that index's label.
    assert train.describe(4, 5).frame_a == train.describe(6, 5).frame_a
    # val/test are fixed sets: the draw seed is ignored.
    val = ColourMatchDataset("val", val_samples=10)
    assert torch.equal(val[(2, 1)]["clip"], val[2]["clip"])
    assert torch.equal(val[(2, 1)]["clip"], val[(2, 999)]["clip"])


def test_balanced_and_single_square_uninformative() -> None:
    ds = ColourMatchDataset("val", val_samples=4000, seed=1)
    specs = [ds.describe(i) for i in range(len(ds))]
    labels = Counter(s.label for s in specs)
    assert labels[0] == labels[1] == 2000
    # Within each class each square's colour is uniform over the palette (chi-square, 7 dof,
    # 99.9% quantile 24.3), so no single square predicts the label.
    for label in (0, 1):
        for which in ("colour_a", "colour_b"):
            counts = np.bincount(
                [getattr(s, which) for s in specs if s.label == label], minlength=8
            )
            chi2 = ((counts - 250) ** 2 / 250).sum()
            assert chi2 < 24.3, (label, which, counts)
    # The best additive rule of the docstring ("same" iff both colours in a fixed half of the
    # palette) scores about 0.643 on this distribution.
    half = set(range(4))
    rule = [int(s.colour_a in half and s.colour_b in half) for s in specs]
    acc = np.mean([r == s.label for r, s in zip(rule, specs)])
    assert abs(acc - (0.5 * 4 / 8 + 0.5 * (1 - 12 / 56))) < 0.02


def test_options() -> None:
    ds = ColourMatchDataset(
        "val", val_samples=50, clip_length=16, crop_size=24, num_colours=3, square=3,
        first_frames=(0, 0), second_frames=(15, 15),
    )  # fmt: skip
    for i in range(50):
        objs = _objects(ds[i]["clip"])
        assert [o[0] for o in objs] == [0, 15]
        assert all(o[5] < 3 and o[6] == 9 for o in objs)
        assert ds[i]["clip"].shape == (3, 16, 24, 24)
    # Overlapping frame ranges: squares in one frame never overlap.
    same_frame = ColourMatchDataset(
        "val", val_samples=100, first_frames=(3, 3), second_frames=(3, 3)
    )
    for i in range(100):
        s = same_frame.describe(i)
        (ya, xa), (yb, xb) = s.top_left_a, s.top_left_b
        assert abs(ya - yb) >= 5 or abs(xa - xb) >= 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "training"}, "unknown mode"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_colours": 9}, "num_colours"),
        ({"square": 40}, "square"),
        ({"first_frames": (0, 8)}, "first_frames"),
        ({"second_frames": (5, 3)}, "second_frames"),
        ({"clip_length": 1}, "clip_length"),
        ({"crop_size": 0}, "crop_size"),
        ({"val_samples": -1}, "val_samples"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ColourMatchDataset(**kwargs)


def test_engine_options_accepted_others_refused() -> None:
    # What the classification task passes to every data set (video options) is ignored ...
    ds = build_dataset(
        "colour_match", mode="test", clip_length=8, crop_size=32, sampling_rate=2,
        jitter=(256, 320), test_scale=256, normalization="original", max_retries=10,
        num_clips=10, test_crop="three", val_samples=4,
    )  # fmt: skip
    assert len(ds) == 4 and ds[0]["clip"].shape == (3, 8, 32, 32)
    # ... a misspelt option is not.
    with pytest.raises(TypeError, match="num_sample"):
        build_dataset("colour_match", num_sample=5)


def test_bad_index() -> None:
    ds = ColourMatchDataset("val", val_samples=4)
    with pytest.raises(IndexError, match="out of range"):
        ds[4]
    with pytest.raises(TypeError, match="index must be an int"):
        ds["0"]  # type: ignore[index]
    with pytest.raises(TypeError, match="dataset\\[\\(i, seed\\)\\]"):
        ds[(1, 2, 3)]  # type: ignore[index]
    assert torch.equal(ds[-1]["clip"], ds[3]["clip"])
    assert torch.equal(ds[np.int64(2)]["clip"], ds[2]["clip"])
