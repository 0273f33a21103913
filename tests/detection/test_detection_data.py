"""COCO-format data (§6): boxes, polygon/RLE masks, keypoints, crowds, the flip with its swap."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nlnet.detection.data import (
    CocoDetectionDataset,
    collate_detection,
    hflip,
    keypoint_flip_indices,
)
from nlnet.detection.synthetic import COCO_KEYPOINT_NAMES, make_shapes_coco

# pycocotools' decoder trips numpy 2's copy-keyword deprecation; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_coco(tmp_path_factory.mktemp("shapes"), num_images=4, seed=0)


def test_targets_match_the_annotation_file(shapes) -> None:
    image_dir, ann_file = shapes
    raw = json.loads(ann_file.read_text())
    ds = CocoDetectionDataset(image_dir, ann_file, train=False)
    assert len(ds) == 4 and ds.num_classes == 4 and ds.classes == ["box", "disc", "person"]
    image, target = ds[0]
    assert image.shape == (3, 128, 128) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    anns = [a for a in raw["annotations"] if a["image_id"] == 1]
    assert len(target["boxes"]) == len(anns)  # val keeps the crowd region
    for a, box, label, mask, crowd in zip(
        anns, target["boxes"], target["labels"], target["masks"], target["iscrowd"]
    ):
        x, y, w, h = a["bbox"]
        assert box.tolist() == [x, y, x + w, y + h]
        assert int(label) == a["category_id"] and int(crowd) == a["iscrowd"]
        # Polygon, compressed RLE and uncompressed RLE all decode to the drawn shape: its area
        # and its tight bounding box.
        assert int(mask.sum()) == int(a["area"])
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] == [
            x,
            y,
            x + w,
            y + h,
        ]
    # The shapes were painted with their category's colour: the masked pixels carry it.
    disc = [i for i, a in enumerate(anns) if a["category_id"] == 2]
    if disc:
        m = target["masks"][disc[0]].bool()
        assert float(image[1][m].mean()) > 0.7 and float(image[0][m].mean()) < 0.3
    train = CocoDetectionDataset(image_dir, ann_file, train=True, flip_prob=0.0)
    assert int(train[0][1]["iscrowd"].sum()) == 0 and len(train[0][1]["boxes"]) == len(anns) - 1


def test_keypoints_and_contiguous_labels(shapes) -> None:
    image_dir, ann_file = shapes
    ds = CocoDetectionDataset(
        image_dir, ann_file, keypoints=True, masks=False, contiguous_labels=True
    )
    assert ds.classes == ["person"] and ds.num_classes == 2 and ds.label_to_category == {1: 3}
    raw = json.loads(ann_file.read_text())
    person = next(a for a in raw["annotations"] if a["image_id"] == 1 and a["category_id"] == 3)
    _, target = ds[0]
    assert "masks" not in target and target["labels"].tolist() == [1]
    want = torch.tensor(person["keypoints"], dtype=torch.float32).reshape(17, 3)
    assert torch.equal(target["keypoints"][0], want)


def test_flip_mirrors_everything_and_swaps_left_right(shapes) -> None:
    image_dir, ann_file = shapes
    kw = {"keypoints": True, "masks": True, "train": True, "contiguous_labels": True}
    plain = CocoDetectionDataset(image_dir, ann_file, flip_prob=0.0, **kw)
    flipped = CocoDetectionDataset(image_dir, ann_file, flip_prob=1.0, **kw)
    img, t = plain[1]
    fimg, ft = flipped[1]
    width = img.shape[-1]
    assert torch.equal(fimg, img.flip(-1))
    assert torch.equal(ft["masks"], t["masks"].flip(-1))
    b, fb = t["boxes"], ft["boxes"]
    assert torch.equal(fb[:, 0], width - b[:, 2]) and torch.equal(fb[:, 2], width - b[:, 0])
    assert torch.equal(fb[:, 1::2], b[:, 1::2])
    names = list(COCO_KEYPOINT_NAMES)
    kp, fkp = t["keypoints"][0], ft["keypoints"][0]
    for i, name in enumerate(names):
        mirror = (
            name.replace("left_", "right_") if "left_" in name else name.replace("right_", "left_")
        )
        j = names.index(mirror)
        assert torch.allclose(fkp[i, 0], width - kp[j, 0]) and fkp[i, 1] == kp[j, 1]
    # A person facing the camera has its left eye on the image's right; after the flip the
    # (new) left eye is again on the right of the nose.
    left_eye, nose = names.index("left_eye"), names.index("nose")
    assert kp[left_eye, 0] > kp[nose, 0] and fkp[left_eye, 0] > fkp[nose, 0]
    # Flipping twice is the identity.
    img2, t2 = hflip(fimg, ft, flipped.flip_indices)
    assert torch.equal(img2, img) and torch.allclose(t2["keypoints"], t["keypoints"])


def test_seeded_draws_and_collate(shapes) -> None:
    image_dir, ann_file = shapes
    ds = CocoDetectionDataset(image_dir, ann_file, train=True, flip_prob=0.5)
    draws = [bool(torch.equal(ds[(0, s)][0], ds[(0, s)][0])) for s in range(6)]
    assert all(draws)  # the same seed, the same flip
    flips = {torch.equal(ds[(0, s)][0], ds.load_image(ds.image_ids[0])) for s in range(12)}
    assert flips == {True, False}  # both outcomes occur over seeds
    images, targets = collate_detection([ds[(0, 1)], ds[(1, 2)]])
    assert len(images) == 2 and images[0].shape != images[1].shape  # left for the model to pad
    assert [int(t["image_id"]) for t in targets] == ds.image_ids[:2]


def test_flip_indices_and_errors(tmp_path, shapes) -> None:
    assert keypoint_flip_indices(["nose", "left_eye", "right_eye", "tail"]) == [0, 2, 1, 3]
    image_dir, ann_file = shapes
    with pytest.raises(FileNotFoundError, match="annotation"):
        CocoDetectionDataset(image_dir, tmp_path / "nope.json")
    with pytest.raises(ValueError, match="category ids"):
        CocoDetectionDataset(image_dir, ann_file, category_ids=[7])
    with pytest.raises(ValueError, match="flip_prob"):
        CocoDetectionDataset(image_dir, ann_file, flip_prob=2.0)
    empty = json.loads(ann_file.read_text())
    for c in empty["categories"]:
        c.pop("keypoints", None)
    path = tmp_path / "nokp.json"
    path.write_text(json.dumps(empty))
    with pytest.raises(ValueError, match="no category with keypoints"):
        CocoDetectionDataset(image_dir, path, keypoints=True)
    assert np.isfinite(CocoDetectionDataset(image_dir, ann_file)[2][1]["area"].numpy()).all()
