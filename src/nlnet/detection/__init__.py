"""§6: Mask R-CNN and keypoint R-CNN with non-local blocks (Tables 5–6), on torchvision.

* :func:`create_detector` / :func:`list_detectors` — the Table 5–6 models and their baselines.
* :class:`CocoDetectionDataset` — COCO-format data (boxes, masks, keypoints; flips).
* :func:`coco_evaluate` — COCOeval for boxes, masks and keypoints.
* :func:`count_detector_flops` — FLOPs per component (the "+<5%" of §6).
* ``nlnet.detection.task`` — the ``detection`` task of the training engine (it registers itself
  when imported; ``nlnet train``/``nlnet eval`` import it for ``task: detection`` configs).
"""

from nlnet.detection.data import CocoDetectionDataset, collate_detection
from nlnet.detection.evaluation import coco_evaluate, detections_to_coco
from nlnet.detection.flops import count_detector_flops
from nlnet.detection.models import (
    NonLocalKeypointHead,
    NonLocalKeypointRCNN,
    NonLocalMaskRCNN,
    NonLocalResNetFPN,
    padding_mask,
)
from nlnet.detection.registry import create_detector, list_detectors, register_detector
from nlnet.detection.weights import load_backbone_weights, load_detector_weights

__all__ = [
    "CocoDetectionDataset",
    "NonLocalKeypointHead",
    "NonLocalKeypointRCNN",
    "NonLocalMaskRCNN",
    "NonLocalResNetFPN",
    "coco_evaluate",
    "collate_detection",
    "count_detector_flops",
    "create_detector",
    "detections_to_coco",
    "list_detectors",
    "load_backbone_weights",
    "load_detector_weights",
    "padding_mask",
    "register_detector",
]
