"""COCO-format data for §6: an annotation JSON + an image folder → torchvision detection targets.

``dataset[i]`` (or ``dataset[(i, seed)]`` for a seeded draw) returns ``(image, target)``:

* ``image``: float (3, H, W) in [0, 1], at the file's resolution.  Resizing (shorter side to
  ``min_size``, longer side at most ``max_size``) and normalisation are done by the detector's
  own transform (torchvision's ``GeneralizedRCNNTransform``), so boxes stay in file pixels.
* ``target``: ``boxes`` (N, 4) float xyxy, ``labels`` (N,) int64, ``masks`` (N, H, W) uint8
  (polygons, RLE and uncompressed RLE decoded by pycocotools), ``keypoints`` (N, K, 3) float
  (x, y, visibility) when the categories have keypoints, ``image_id``, ``area``, ``iscrowd``.

Training drops crowd regions and degenerate boxes and (by default) images left without
annotations; the only augmentation done here is the horizontal flip, which mirrors boxes, masks
and keypoints and swaps each ``left_*`` keypoint with its ``right_*`` partner (COCO's convention).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset


def read_rgb(path: str | os.PathLike[str]) -> Tensor:
    """uint8 (3, H, W) RGB image from a file (Pillow; torchvision's decoders are deprecated)."""
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def keypoint_flip_indices(names: Sequence[str]) -> list[int]:
    """For each keypoint, the index of its mirror image (``left_x`` ↔ ``right_x``; others: itself)."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for i, n in enumerate(names):
        if n.startswith("left_"):
            out.append(index.get("right_" + n[5:], i))
        elif n.startswith("right_"):
            out.append(index.get("left_" + n[6:], i))
        else:
            out.append(i)
    return out


def hflip(
    image: Tensor, target: dict[str, Tensor], flip_indices: Sequence[int] | None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror an image and its target left–right (continuous coordinates: x ↦ W − x)."""
    width = image.shape[-1]
    image = image.flip(-1)
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, 0], boxes[:, 2] = width - target["boxes"][:, 2], width - target["boxes"][:, 0]
    target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    if "keypoints" in target:
        kp = target["keypoints"].clone()
        if flip_indices is not None:
            kp = kp[:, list(flip_indices)]
        kp[..., 0] = width - kp[..., 0]
        kp[kp[..., 2] == 0] = 0  # unlabelled keypoints stay (0, 0, 0), as in COCO files
        target["keypoints"] = kp
    return image, target


class CocoDetectionDataset(Dataset):
    """A COCO-format detection / instance segmentation / keypoint data set.

    Args:
        image_dir: folder holding the images named by ``file_name`` in the JSON.
        annotation_file: the COCO annotation JSON.
        train: training mode (crowds and degenerate boxes dropped, flips drawn).
        flip_prob: probability of a horizontal flip in training.
        masks: decode instance masks (Mask R-CNN).
        keypoints: return keypoints (keypoint R-CNN); only categories with keypoints are kept.
        category_ids: restrict to these COCO category ids (default all, or those with keypoints).
        contiguous_labels: label categories 1..C in id order instead of by their COCO id (the
            torchvision convention, labels = ids, needs ``num_classes`` > the largest id: 91 on COCO).
        remove_empty: drop images without a usable annotation (default: ``train``).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike[str],
        annotation_file: str | os.PathLike[str],
        *,
        train: bool = False,
        flip_prob: float = 0.5,
        masks: bool = True,
        keypoints: bool = False,
        category_ids: Sequence[int] | None = None,
        contiguous_labels: bool = False,
        remove_empty: bool | None = None,
    ) -> None:
        from pycocotools.coco import COCO

        self.image_dir = Path(image_dir)
        annotation_file = Path(annotation_file)
        if not annotation_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {annotation_file}")
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_dir}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob!r}")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO(str(annotation_file))
        self.train = train
        self.flip_prob = flip_prob
        self.with_masks = masks
        self.with_keypoints = keypoints

        cats = self.coco.loadCats(self.coco.getCatIds())
        if keypoints:
            cats = [c for c in cats if c.get("keypoints")]
            if not cats:
                raise ValueError(f"{annotation_file} has no category with keypoints")
        if category_ids is not None:
            wanted = set(category_ids)
            unknown = wanted - {c["id"] for c in cats}
            if unknown:
                raise ValueError(f"category ids {sorted(unknown)} are not in {annotation_file}")
            cats = [c for c in cats if c["id"] in wanted]
        cats = sorted(cats, key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in cats]
        self.classes = [c["name"] for c in cats]
        if contiguous_labels:
            self.category_to_label = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        else:
            self.category_to_label = {cid: cid for cid in self.category_ids}
        self.label_to_category = {v: k for k, v in self.category_to_label.items()}
        self.num_classes = max(self.category_to_label.values(), default=0) + 1
        self.keypoint_names: list[str] = list(cats[0].get("keypoints", [])) if keypoints else []
        if keypoints and any(list(c["keypoints"]) != self.keypoint_names for c in cats):
            raise ValueError("all keypoint categories must share the same keypoint names")
        self.flip_indices = keypoint_flip_indices(self.keypoint_names) if keypoints else None

        ids = sorted(self.coco.getImgIds())
        if remove_empty if remove_empty is not None else train:
            ids = [i for i in ids if self._trainable(i)]
        if not ids:
            raise ValueError(f"no usable images in {annotation_file}")
        self.image_ids: list[int] = ids

    def __len__(self) -> int:
        return len(self.image_ids)

    def _usable_annotations(self, image_id: int) -> list[dict[str, Any]]:
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id]))
        keep = []
        for a in anns:
            if a["category_id"] not in self.category_to_label:
                continue
            if self.train and a.get("iscrowd", 0):
                continue
            _, _, w, h = a["bbox"]
            if w < 1 or h < 1:
                continue
            keep.append(a)
        return keep

    def _trainable(self, image_id: int) -> bool:
        anns = self._usable_annotations(image_id)
        if self.with_keypoints:  # keypoint training needs labelled keypoints (COCO's rule)
            return any(a.get("num_keypoints", 0) > 0 for a in anns)
        return bool(anns)

    def load_image(self, image_id: int) -> Tensor:
        info = self.coco.loadImgs([image_id])[0]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"image {image_id} not found at {path}")
        return read_rgb(path).float().div_(255.0)

    def target(self, image_id: int, height: int, width: int) -> dict[str, Tensor]:
        """The torchvision target of one image, in its file's pixel coordinates."""
        anns = self._usable_annotations(image_id)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        anns = [a for a, k in zip(anns, keep.tolist()) if k]
        target: dict[str, Tensor] = {
            "boxes": boxes[keep],
            "labels": torch.tensor(
                [self.category_to_label[a["category_id"]] for a in anns], dtype=torch.int64
            ),
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
        }
        if self.with_masks:
            masks = np.zeros((len(anns), height, width), dtype=np.uint8)
            for j, a in enumerate(anns):
                if a.get("segmentation"):
                    masks[j] = self.coco.annToMask(a)
            target["masks"] = torch.from_numpy(masks)
        if self.with_keypoints:
            k = len(self.keypoint_names)
            kps = torch.zeros((len(anns), k, 3), dtype=torch.float32)
            for j, a in enumerate(anns):
                if a.get("keypoints"):
                    kps[j] = torch.tensor(a["keypoints"], dtype=torch.float32).reshape(k, 3)
            target["keypoints"] = kps
        return target

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, dict[str, Tensor]]:
        generator = None
        if isinstance(key, tuple):
            index, seed = key
            generator = torch.Generator().manual_seed(int(seed))
        else:
            index = key
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image_id = self.image_ids[index]
        image = self.load_image(image_id)
        target = self.target(image_id, image.shape[-2], image.shape[-1])
        if self.train and self.flip_prob > 0:
            if float(torch.rand((), generator=generator)) < self.flip_prob:
                image, target = hflip(image, target, self.flip_indices)
        return image, target


def collate_detection(
    batch: Sequence[tuple[Tensor, dict[str, Tensor]]],
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Keep images as a list: the detector pads them itself (and masks the padding)."""
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets
