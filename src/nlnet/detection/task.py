"""The COCO detection task (§6) for the shared training engine (``nlnet train`` / ``nlnet eval``).

Config → explicit arguments (modelling code never reads the config):

==========================  =====================================================================
config key                  meaning here
==========================  =====================================================================
``task``                    ``detection``
``model.name``              a detector of :func:`nlnet.detection.list_detectors`
``model.num_classes``       with background (91 for COCO ids; None: from the training set)
``model.pretrained``        ImageNet ResNet in torchvision format (path or URL) for the backbone
``model.init_from``         a detector checkpoint (e.g. a baseline → its non-local model)
``model.kwargs``            :func:`~nlnet.detection.create_detector` arguments (``min_size``,
                            ``max_size``, ``trainable_backbone_layers``, ``nonlocal_kwargs``, ...)
``data.root/annotations``   training images folder / COCO JSON (train2017)
``data.val_root/val_anno…`` validation images folder / COCO JSON (val2017)
``data.extra``              ``flip_prob`` (0.5), ``contiguous_labels`` (false), ``category_ids``,
                            ``mask_threshold`` (0.5), ``keypoint_sigmas`` (COCO's)
==========================  =====================================================================

A training step returns the sum of the detector's losses (RPN objectness and box regression, box
classification and regression, mask or keypoint loss) and logs each of them; evaluation runs
COCOeval for boxes, plus masks (Mask R-CNN) or keypoints (keypoint R-CNN), over all ranks.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from nlnet.detection.data import CocoDetectionDataset, collate_detection
from nlnet.detection.evaluation import coco_evaluate, detections_to_coco
from nlnet.engine import distributed as dist
from nlnet.engine.task import register_task
from nlnet.io import atomic_write_text

_EXTRA_KEYS = (
    "flip_prob",
    "contiguous_labels",
    "category_ids",
    "mask_threshold",
    "keypoint_sigmas",
)


class DetectionTask:
    """:class:`nlnet.engine.task.Task` for Mask R-CNN / keypoint R-CNN on COCO-format data.

    Args:
        model_name: a registered detector name.
        train_images, train_annotations: training image folder and COCO JSON.
        val_images, val_annotations: validation image folder and COCO JSON.
        num_classes: with background; None takes it from the training (else validation) data.
        model_kwargs: :func:`~nlnet.detection.create_detector` keyword arguments.
        pretrained_backbone: ImageNet ResNet weights (path/URL) for the backbone.
        init_from: detector weights to start from (a baseline loads into an NL model).
        flip_prob: horizontal flip probability in training.
        contiguous_labels, category_ids: see :class:`CocoDetectionDataset`.
        mask_threshold: soft-mask threshold for the ``segm`` results.
        keypoint_sigmas: OKS σ per keypoint when not COCO's 17.
    """

    def __init__(
        self,
        model_name: str,
        *,
        train_images: str | None = None,
        train_annotations: str | None = None,
        val_images: str | None = None,
        val_annotations: str | None = None,
        num_classes: int | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        pretrained_backbone: str | None = None,
        init_from: str | None = None,
        flip_prob: float = 0.5,
        contiguous_labels: bool = False,
        category_ids: Sequence[int] | None = None,
        mask_threshold: float = 0.5,
        keypoint_sigmas: Sequence[float] | None = None,
    ) -> None:
        from nlnet.detection.registry import list_detectors

        if model_name not in list_detectors():
            raise ValueError(
                f"unknown detector {model_name!r}; expected one of {', '.join(list_detectors())}"
            )
        self.model_name = model_name
        self.keypoints = model_name.startswith("keypointrcnn")
        self.iou_types = ("bbox", "keypoints") if self.keypoints else ("bbox", "segm")
        self.paths = {
            "train": (train_images, train_annotations),
            "val": (val_images, val_annotations),
        }
        self._num_classes = num_classes
        self.model_kwargs = dict(model_kwargs or {})
        self.pretrained_backbone = pretrained_backbone
        self.init_from = init_from
        self.flip_prob = flip_prob
        self.contiguous_labels = contiguous_labels
        self.category_ids = list(category_ids) if category_ids is not None else None
        self.mask_threshold = mask_threshold
        self.keypoint_sigmas = list(keypoint_sigmas) if keypoint_sigmas is not None else None
        self._datasets: dict[str, CocoDetectionDataset] = {}
        self._eval_split = "val"

    @classmethod
    def from_config(cls, cfg: Any) -> DetectionTask:
        """Translate an engine :class:`nlnet.config.Config` (see the module docstring)."""
        if getattr(cfg.model, "freeze_bn", False):
            raise ValueError(
                "model.freeze_bn is not used by detectors: the ResNet's BN is already frozen "
                "(FrozenBatchNorm2d), and freezing the non-local blocks' BN (γ = 0 at init) "
                "would keep them at the identity"
            )
        extra = dict(cfg.data.extra)
        unknown = sorted(set(extra) - set(_EXTRA_KEYS))
        if unknown:
            raise ValueError(
                f"data.extra keys {unknown} are not understood by the detection task "
                f"(expected some of {list(_EXTRA_KEYS)})"
            )
        return cls(
            cfg.model.name,
            train_images=cfg.data.root,
            train_annotations=cfg.data.annotations,
            val_images=cfg.data.val_root or cfg.data.root,
            val_annotations=cfg.data.val_annotations,
            num_classes=cfg.model.num_classes,
            model_kwargs=cfg.model.kwargs,
            pretrained_backbone=cfg.model.pretrained,
            init_from=cfg.model.init_from,
            **extra,
        )

    # -- model ----------------------------------------------------------------------------------
    def num_classes(self) -> int:
        if self._num_classes is not None:
            return self._num_classes
        split = "train" if all(self.paths["train"]) else "val"
        return self.build_dataset(split).num_classes

    def build_model(self) -> nn.Module:
        from nlnet.detection.registry import create_detector

        return create_detector(
            self.model_name,
            self.num_classes(),
            pretrained_backbone=self.pretrained_backbone,
            weights=self.init_from,
            **self.model_kwargs,
        )

    # -- data -----------------------------------------------------------------------------------
    def build_dataset(self, split: str) -> Dataset:
        """``train`` (flips, no crowds) or ``val`` / ``test`` (both read the validation files)."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        key = "train" if split == "train" else "val"
        if key not in self._datasets:
            images, annotations = self.paths[key]
            if not images or not annotations:
                which = "data.root / data.annotations" if key == "train" else "data.val_annotations"
                raise ValueError(f"the {key} data set needs {which} (image folder and COCO JSON)")
            self._datasets[key] = CocoDetectionDataset(
                images,
                annotations,
                train=key == "train",
                flip_prob=self.flip_prob,
                masks=not self.keypoints,
                keypoints=self.keypoints,
                category_ids=self.category_ids,
                contiguous_labels=self.contiguous_labels,
            )
        if key == "val":
            self._eval_split = key
        return self._datasets[key]

    def collate_fn(self) -> Callable[[list[Any]], Any]:
        return collate_detection

    # -- training -------------------------------------------------------------------------------
    @staticmethod
    def _to(batch: Any, device: torch.device) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        images, targets = batch
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        return images, targets

    def training_step(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[Tensor, dict[str, float]]:
        images, targets = self._to(batch, device)
        losses = model(images, targets)
        loss = sum(v.float() for v in losses.values())
        assert isinstance(loss, Tensor)
        scalars = {k: float(v.detach()) for k, v in losses.items()}
        scalars["loss"] = float(loss.detach())
        return loss, scalars

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batches: Iterable[Any], device: torch.device, out_dir: Path | None
    ) -> dict[str, float]:
        """COCOeval of the detections on the validation set; rank 0 writes under ``out_dir``:
        ``coco_results_<type>.json`` (COCO result format), ``coco_eval.txt`` and ``metrics.json``."""
        dataset = self._datasets.get(self._eval_split) or self.build_dataset("val")
        assert isinstance(dataset, CocoDetectionDataset)
        was_training = model.training
        model.eval()
        results: dict[str, list[dict[str, Any]]] = {t: [] for t in self.iou_types}
        seen: list[int] = []
        for batch in batches:
            images, targets = batch
            outputs = model([img.to(device, non_blocking=True) for img in images])
            ids = [int(t["image_id"]) for t in targets]
            seen += ids
            records = detections_to_coco(
                outputs, ids, dataset.label_to_category, mask_threshold=self.mask_threshold
            )
            for t in self.iou_types:
                results[t] += records[t]
        model.train(was_training)

        gathered = dist.all_gather_object((results, seen))
        metrics: dict[str, float] = {}
        if dist.is_main():
            all_results = {t: [r for res, _ in gathered for r in res[t]] for t in self.iou_types}
            all_ids = sorted({i for _, ids in gathered for i in ids})
            metrics, summary = coco_evaluate(
                dataset.coco,
                all_results,
                iou_types=self.iou_types,
                image_ids=all_ids,
                category_ids=dataset.category_ids,
                keypoint_sigmas=self.keypoint_sigmas,
            )
            metrics["images"] = float(len(all_ids))
            if out_dir is not None:
                out = Path(out_dir)
                for t in self.iou_types:
                    atomic_write_text(out / f"coco_results_{t}.json", json.dumps(all_results[t]))
                atomic_write_text(out / "coco_eval.txt", summary)
                atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        return dist.broadcast_object(metrics)


@register_task("detection")
def build_detection_task(config: Any) -> DetectionTask:
    """The engine's entry point: ``task: detection`` in a config."""
    return DetectionTask.from_config(config)
