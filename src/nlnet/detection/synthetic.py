"""A tiny COCO-format data set of coloured shapes, for tests, demos and smoke runs of §6's code.

Three categories, covering every annotation kind the COCO loaders meet:

* ``1 box``: a red rectangle, segmentation as a **polygon**;
* ``2 disc``: a green ellipse, segmentation as **compressed RLE**;
* ``3 person``: a blue rectangle with COCO's 17 named keypoints drawn as white dots (the
  ``left_*`` ones on the image's right, as for a person facing the camera), polygon mask.

One image also has a crowd region (uncompressed RLE, ``iscrowd=1``).  Images have different
sizes so batches get padded.  Everything is drawn from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

COCO_KEYPOINT_NAMES: tuple[str, ...] = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8),
    (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)  # fmt: skip
# (x, y) of each keypoint in a unit box; left_* on the right half (the person faces us).
_KEYPOINT_LAYOUT = np.array(
    [
        (0.5, 0.08), (0.62, 0.05), (0.38, 0.05), (0.75, 0.1), (0.25, 0.1), (0.8, 0.25),
        (0.2, 0.25), (0.9, 0.42), (0.1, 0.42), (0.92, 0.58), (0.08, 0.58), (0.7, 0.6),
        (0.3, 0.6), (0.72, 0.78), (0.28, 0.78), (0.75, 0.95), (0.25, 0.95),
    ]
)  # fmt: skip
CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "box", "supercategory": "shape"},
    {"id": 2, "name": "disc", "supercategory": "shape"},
    {
        "id": 3,
        "name": "person",
        "supercategory": "shape",
        "keypoints": list(COCO_KEYPOINT_NAMES),
        "skeleton": [list(e) for e in COCO_SKELETON],
    },
]
_COLOURS = {1: (220, 40, 40), 2: (40, 200, 60), 3: (50, 80, 230)}


def _rle_string(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE: run lengths of 0s then 1s, … over the column-major pixels."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = int(v), 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def make_shapes_coco(
    root: str | os.PathLike[str],
    *,
    num_images: int = 4,
    sizes: tuple[tuple[int, int], ...] = ((128, 128), (96, 128), (128, 112)),
    seed: int = 0,
    split: str = "train",
) -> tuple[Path, Path]:
    """Write ``root/<split>/*.png`` and ``root/<split>.json``; return (image folder, JSON path).

    Every image holds one person (with 17 keypoints) plus one or two other shapes.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = 1
    for i in range(num_images):
        h, w = sizes[i % len(sizes)]
        canvas = np.full((h, w, 3), 16, dtype=np.uint8)
        canvas += rng.integers(0, 24, size=(h, w, 3), dtype=np.uint8)
        cats = [3, *rng.permutation([1, 2])[: int(rng.integers(1, 3))].tolist()]
        placed: list[tuple[int, int, int, int]] = []
        for cat in cats:
            for _ in range(50):  # rejection-sample a box that doesn't overlap earlier shapes
                bw, bh = int(rng.integers(w // 5, w // 2.5)), int(rng.integers(h // 5, h // 2.5))
                if cat == 3:
                    bh = max(bh, int(bw * 1.3))
                bh = min(bh, h - 2)
                x0, y0 = int(rng.integers(1, w - bw)), int(rng.integers(1, h - bh))
                if all(
                    x0 + bw <= a or a + c <= x0 or y0 + bh <= b or b + d <= y0
                    for a, b, c, d in placed
                ):
                    break
            placed.append((x0, y0, bw, bh))
            mask = np.zeros((h, w), dtype=bool)
            ann: dict[str, Any] = {"id": ann_id, "image_id": i + 1, "category_id": cat}
            ann_id += 1
            if cat == 2:
                yy, xx = np.mgrid[0:h, 0:w]
                cy, cx = y0 + bh / 2 - 0.5, x0 + bw / 2 - 0.5
                mask = ((yy - cy) / (bh / 2)) ** 2 + ((xx - cx) / (bw / 2)) ** 2 <= 1.0
                ann["segmentation"] = _rle_string(mask)
            else:
                mask[y0 : y0 + bh, x0 : x0 + bw] = True
                x1, y1 = x0 + bw, y0 + bh
                ann["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
            canvas[mask] = _COLOURS[cat]
            ys, xs = np.nonzero(mask)
            ann["bbox"] = [
                float(xs.min()),
                float(ys.min()),
                float(xs.max() + 1 - xs.min()),
                float(ys.max() + 1 - ys.min()),
            ]
            ann["area"] = float(mask.sum())
            ann["iscrowd"] = 0
            if cat == 3:
                kx = x0 + _KEYPOINT_LAYOUT[:, 0] * bw
                ky = y0 + _KEYPOINT_LAYOUT[:, 1] * bh
                for x, y in zip(kx, ky):
                    canvas[int(y) - 1 : int(y) + 1, int(x) - 1 : int(x) + 1] = 255
                ann["keypoints"] = [
                    v for x, y in zip(kx, ky) for v in (round(float(x), 2), round(float(y), 2), 2)
                ]
                ann["num_keypoints"] = len(COCO_KEYPOINT_NAMES)
            annotations.append(ann)
        if i == 0:  # a crowd region (uncompressed RLE) in a free corner of the first image
            crowd = np.zeros((h, w), dtype=bool)
            crowd[h - 6 : h - 1, 1:6] = True
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": 1,
                    "category_id": 1,
                    "segmentation": _uncompressed_rle(crowd),
                    "bbox": [1.0, float(h - 6), 5.0, 5.0],
                    "area": float(crowd.sum()),
                    "iscrowd": 1,
                }
            )
            ann_id += 1
        name = f"{i + 1:06d}.png"
        Image.fromarray(canvas).save(image_dir / name)
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
    ann_file = root / f"{split}.json"
    ann_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES})
    )
    return image_dir, ann_file
