"""COCO evaluation (Tables 5–6): detections → COCO result records → pycocotools' COCOeval.

Table 5 reports AP^box, AP^box_50, AP^box_75 and AP^mask, AP^mask_50, AP^mask_75; Table 6
AP^kp, AP^kp_50, AP^kp_75.  :func:`coco_evaluate` returns them (plus the small/medium/large
splits) as ``"bbox/AP"``, ``"segm/AP50"``, ``"keypoints/AP75"``, ... in percent.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

IOU_TYPES: tuple[str, ...] = ("bbox", "segm", "keypoints")
_STAT_NAMES = {
    "bbox": (
        "AP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
        "AR1",
        "AR10",
        "AR100",
        "ARs",
        "ARm",
        "ARl",
    ),
    "keypoints": ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"),
}
_STAT_NAMES["segm"] = _STAT_NAMES["bbox"]


def detections_to_coco(
    detections: Sequence[Mapping[str, Tensor]],
    image_ids: Sequence[int],
    label_to_category: Mapping[int, int],
    *,
    mask_threshold: float = 0.5,
) -> dict[str, list[dict[str, Any]]]:
    """COCO result records per IoU type from torchvision detector outputs (input-image pixels).

    Boxes become ``[x, y, w, h]``; soft masks (N, 1, H, W) are thresholded at ``mask_threshold``
    and RLE-encoded; keypoints (N, K, 3) are flattened as COCO's ``[x, y, v, ...]``.
    """
    from pycocotools import mask as mask_utils

    if len(detections) != len(image_ids):
        raise ValueError(f"{len(detections)} detections for {len(image_ids)} image ids")
    out: dict[str, list[dict[str, Any]]] = {"bbox": [], "segm": [], "keypoints": []}
    for det, image_id in zip(detections, image_ids):
        boxes = det["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        scores = det["scores"].detach().float().cpu().tolist()
        labels = det["labels"].detach().cpu().tolist()
        unknown = {lab for lab in labels if lab not in label_to_category}
        if unknown:
            raise ValueError(f"predicted labels {sorted(unknown)} have no COCO category id")
        cats = [label_to_category[lab] for lab in labels]
        base = [
            {"image_id": int(image_id), "category_id": c, "score": s} for c, s in zip(cats, scores)
        ]
        out["bbox"] += [{**b, "bbox": [round(v, 3) for v in box]} for b, box in zip(base, xywh)]
        if "masks" in det:
            masks = (det["masks"].detach().cpu()[:, 0] > mask_threshold).numpy().astype(np.uint8)
            rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
            for b, rle in zip(base, rles):
                # Plain str/int so the records are JSON (pycocotools gives bytes and uint32).
                segm = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}
                out["segm"].append({**b, "segmentation": segm})
        if "keypoints" in det:
            kps = det["keypoints"].detach().float().cpu().flatten(1).tolist()
            out["keypoints"] += [
                {**b, "keypoints": [round(v, 3) for v in kp]} for b, kp in zip(base, kps)
            ]
    return out


def coco_evaluate(
    coco_gt: Any,
    results: Mapping[str, list[dict[str, Any]]],
    *,
    iou_types: Iterable[str],
    image_ids: Sequence[int] | None = None,
    category_ids: Sequence[int] | None = None,
    keypoint_sigmas: Sequence[float] | None = None,
) -> tuple[dict[str, float], str]:
    """Run COCOeval for each IoU type; returns (metrics in percent, COCOeval's printed summary).

    ``image_ids`` restricts the evaluation to the images that were run (default: all of
    ``coco_gt``), ``category_ids`` to the categories the model detects (default: all; keypoint
    evaluation always uses the categories that have keypoints).  ``keypoint_sigmas`` (the OKS σ per keypoint) defaults to COCO's 17 values and
    is required for other keypoint sets.  An IoU type without any detection scores 0.
    """
    from pycocotools.cocoeval import COCOeval

    metrics: dict[str, float] = {}
    log = io.StringIO()
    for iou_type in iou_types:
        if iou_type not in IOU_TYPES:
            raise ValueError(f"unknown IoU type {iou_type!r}; expected one of {IOU_TYPES}")
        records = list(results.get(iou_type, []))
        names = _STAT_NAMES[iou_type]
        if not records:
            metrics.update({f"{iou_type}/{n}": 0.0 for n in names})
            log.write(f"{iou_type}: no detections\n")
            continue
        with contextlib.redirect_stdout(log):
            # loadRes adds keys (area, id, bbox) to the records it is given: hand it copies.
            coco_dt = coco_gt.loadRes([dict(r) for r in records])
            evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = sorted({int(i) for i in image_ids})
            cats = category_ids
            if iou_type == "keypoints":
                with_kp = [
                    c["id"] for c in coco_gt.loadCats(coco_gt.getCatIds()) if c.get("keypoints")
                ]
                cats = [c for c in (cats or with_kp) if c in with_kp]
            if cats is not None:
                evaluator.params.catIds = sorted({int(c) for c in cats})
            if iou_type == "keypoints":
                k = len(records[0]["keypoints"]) // 3
                if keypoint_sigmas is not None:
                    sigmas = np.asarray(keypoint_sigmas, dtype=np.float64)
                elif k == len(evaluator.params.kpt_oks_sigmas):
                    sigmas = evaluator.params.kpt_oks_sigmas
                else:
                    raise ValueError(
                        f"keypoint_sigmas are needed for {k} keypoints (COCO's σ cover "
                        f"{len(evaluator.params.kpt_oks_sigmas)})"
                    )
                if len(sigmas) != k:
                    raise ValueError(f"{len(sigmas)} keypoint_sigmas for {k} keypoints")
                evaluator.params.kpt_oks_sigmas = sigmas
            log.write(f"== {iou_type} ==\n")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        for name, value in zip(names, evaluator.stats):
            # COCOeval marks "no ground truth in this area range" as -1; keep it visible as -1.
            metrics[f"{iou_type}/{name}"] = float(value) * 100.0 if value >= 0 else -1.0
    return metrics, log.getvalue()
