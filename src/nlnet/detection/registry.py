"""The detector registry: ``create_detector(name, ...)`` and ``list_detectors()`` (Tables 5–6).

=========================================  ==========================================  ========
name                                       what it is                                  paper
=========================================  ==========================================  ========
``maskrcnn_r50_fpn``                       Mask R-CNN R50-FPN baseline                 Table 5
``maskrcnn_r50_fpn_nl``                    + 1 non-local block before res4's last      Table 5
``maskrcnn_r101_fpn``                      Mask R-CNN R101-FPN baseline                Table 5
``maskrcnn_r101_fpn_nl``                   + 1 non-local block                         Table 5
``keypointrcnn_r101_fpn``                  keypoint R-CNN R101-FPN baseline            Table 6
``keypointrcnn_r101_fpn_nl_head``          + 4 non-local blocks in the keypoint head   Table 6
``keypointrcnn_r101_fpn_nl_head_backbone`` + 4 in the head, + 1 in the backbone        Table 6
``keypointrcnn_r50_fpn*``                  the same three on ResNet-50                 —
=========================================  ==========================================  ========
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from torch import nn

from nlnet.detection.models import build_keypointrcnn, build_maskrcnn
from nlnet.detection.weights import load_backbone_weights, load_detector_weights
from nlnet.registry import Registry

DETECTORS: Registry[Callable[..., nn.Module]] = Registry("detector")
# Default class count per family: COCO's 91 ids (torchvision convention) / person + background.
_DEFAULT_CLASSES = {"maskrcnn": 91, "keypointrcnn": 2}


def register_detector(
    name: str,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder ``fn(num_classes=..., **kwargs) -> nn.Module``."""
    return DETECTORS.register(name)


for _depth in (50, 101):
    register_detector(f"maskrcnn_r{_depth}_fpn")(partial(build_maskrcnn, _depth))
    register_detector(f"maskrcnn_r{_depth}_fpn_nl")(
        partial(build_maskrcnn, _depth, nonlocal_backbone=True)
    )
    register_detector(f"keypointrcnn_r{_depth}_fpn")(partial(build_keypointrcnn, _depth))
    register_detector(f"keypointrcnn_r{_depth}_fpn_nl_head")(
        partial(build_keypointrcnn, _depth, nonlocal_head=True)
    )
    register_detector(f"keypointrcnn_r{_depth}_fpn_nl_head_backbone")(
        partial(build_keypointrcnn, _depth, nonlocal_head=True, nonlocal_backbone=True)
    )


def list_detectors(pattern: str = "*") -> list[str]:
    """Registered detector names matching a shell-style ``pattern``, sorted."""
    return DETECTORS.names(pattern)


def default_num_classes(name: str) -> int:
    """91 (COCO category ids + background) for Mask R-CNN, 2 (person + background) for keypoints."""
    return _DEFAULT_CLASSES[name.split("_", 1)[0]]


def create_detector(
    name: str,
    num_classes: int | None = None,
    *,
    pretrained_backbone: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    weights: str | os.PathLike[str] | Mapping[str, Any] | None = None,
    model_dir: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered detector.

    Args:
        name: see :func:`list_detectors`.
        num_classes: including background; default 91 (COCO ids) for Mask R-CNN, 2 for keypoints.
        pretrained_backbone: ImageNet ResNet weights in torchvision format (path, URL or state
            dict) loaded into the backbone (§6: fine-tuned from ImageNet).
        weights: a whole-detector checkpoint (path, URL or state dict); a baseline checkpoint
            may be loaded into a non-local model (the blocks stay at identity).
        model_dir: cache folder for URLs (default: torch.hub's).
        **kwargs: builder arguments (``trainable_backbone_layers``, ``nonlocal_kwargs``,
            ``num_keypoints``) and torchvision detector arguments (``min_size``, ``max_size``,
            ``box_detections_per_img``, ...).
    """
    builder = DETECTORS.get(name)
    if num_classes is None:
        num_classes = default_num_classes(name)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (with background), got {num_classes!r}")
    model = builder(num_classes=num_classes, **kwargs)
    if pretrained_backbone is not None:
        load_backbone_weights(model, pretrained_backbone, model_dir=model_dir)
    if weights is not None:
        load_detector_weights(model, weights, model_dir=model_dir)
    return model
