"""``nlnet detect --checkpoint CK IMAGE... --out DIR``: draw a detector's boxes, masks and keypoints.

The checkpoint is an engine checkpoint (``nlnet train`` output: the detector's name and settings
come from its stored config) or a plain detector state dict (then ``--model`` names the
architecture).  The number of classes and keypoints are read from the weights.  For each image,
``DIR/<name>.png`` shows the detections above ``--score-threshold`` and ``DIR/<name>.json``
lists them (boxes in image pixels).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.utils import draw_bounding_boxes, draw_keypoints, draw_segmentation_masks

from nlnet.detection.synthetic import COCO_SKELETON
from nlnet.io import atomic_write

_PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
]  # fmt: skip


def load_detector_checkpoint(
    path: str | os.PathLike[str], model_name: str | None = None, **overrides: Any
) -> tuple[nn.Module, dict[int, str]]:
    """A detector in eval mode from a checkpoint, and its label → class-name map."""
    from nlnet.detection.registry import create_detector, list_detectors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    config: Mapping[str, Any] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        config = obj.get("config") or {}
        state = obj["model"]
    else:
        state = obj
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds neither an nlnet checkpoint nor a detector state dict")
    model_cfg = dict(config.get("model") or {})
    name = model_name or model_cfg.get("name")
    if name is None:
        raise ValueError(f"{path} is a plain state dict: name its architecture with --model")
    if name not in list_detectors():
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(list_detectors())}")
    kwargs = dict(model_cfg.get("kwargs") or {})
    kwargs.update(overrides)
    cls_key = "roi_heads.box_predictor.cls_score.weight"
    if cls_key not in state:
        raise ValueError(f"{path} has no {cls_key}: not a Mask/keypoint R-CNN state dict")
    num_classes = int(state[cls_key].shape[0])
    kp_key = "roi_heads.keypoint_predictor.kps_score_lowres.weight"
    if kp_key in state:
        kwargs["num_keypoints"] = int(state[kp_key].shape[1])
    model = create_detector(name, num_classes, weights=dict(state), **kwargs)
    model.eval()
    return model, _class_names(num_classes, name, config)


def _class_names(num_classes: int, name: str, config: Mapping[str, Any]) -> dict[int, str]:
    data = config.get("data") or {}
    ann = data.get("val_annotations") or data.get("annotations")
    extra = data.get("extra") or {}
    if ann and Path(ann).is_file():
        cats = sorted(json.loads(Path(ann).read_text())["categories"], key=lambda c: c["id"])
        if extra.get("contiguous_labels"):
            return {i + 1: c["name"] for i, c in enumerate(cats)}
        return {c["id"]: c["name"] for c in cats}
    if name.startswith("keypointrcnn") and num_classes == 2:
        return {1: "person"}
    if num_classes == 91:
        from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

        return dict(enumerate(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]))
    return {i: f"class {i}" for i in range(1, num_classes)}


def draw_detections(
    image: Tensor,
    detection: Mapping[str, Tensor],
    class_names: Mapping[int, str],
    *,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    skeleton: Sequence[tuple[int, int]] | None = COCO_SKELETON,
) -> Tensor:
    """uint8 (3, H, W) image with the detections above ``score_threshold`` drawn on it."""
    keep = detection["scores"] >= score_threshold
    boxes = detection["boxes"][keep].detach().float().cpu()
    labels = detection["labels"][keep].cpu().tolist()
    scores = detection["scores"][keep].detach().float().cpu().tolist()
    colours = [_PALETTE[lab % len(_PALETTE)] for lab in labels]
    out = image
    if "masks" in detection and boxes.numel():
        masks = detection["masks"][keep][:, 0].detach().cpu() > mask_threshold
        out = draw_segmentation_masks(out, masks, alpha=0.45, colors=colours)
    if boxes.numel():
        text = [f"{class_names.get(lab, lab)} {s:.2f}" for lab, s in zip(labels, scores)]
        out = draw_bounding_boxes(out, boxes, labels=text, colors=colours, width=2)
    if "keypoints" in detection and boxes.numel():
        kps = detection["keypoints"][keep].detach().float().cpu()
        connectivity = None
        if skeleton is not None and kps.shape[1] == 17:
            connectivity = [(a - 1, b - 1) for a, b in skeleton]  # COCO's skeleton is 1-based
        visible = None
        if "keypoints_scores" in detection:
            visible = detection["keypoints_scores"][keep].detach().cpu() > 0
        out = draw_keypoints(
            out, kps[..., :2], connectivity=connectivity, colors="white", radius=2, width=2,
            visibility=visible,
        )  # fmt: skip
    return out


def write_png(image: Tensor, path: Path) -> None:
    from PIL import Image

    with atomic_write(path) as fh:
        Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(fh, format="PNG")
