"""configs/coco: every Table 5–6 recipe parses with the engine's schema and builds its detector."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nlnet.detection.task import DetectionTask

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "coco").glob("[!_]*.yaml"))


def test_every_table_row_has_a_recipe() -> None:
    names = {p.stem for p in CONFIGS}
    assert names == {
        "maskrcnn_r50_fpn",
        "maskrcnn_r50_fpn_nl",
        "maskrcnn_r101_fpn",
        "maskrcnn_r101_fpn_nl",
        "keypointrcnn_r101_fpn",
        "keypointrcnn_r101_fpn_nl_head",
        "keypointrcnn_r101_fpn_nl_head_backbone",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_builds_its_detector(path: Path) -> None:
    from nlnet import config

    cfg = config.load_config(path)
    assert cfg.task == "detection" and cfg.model.name == path.stem
    assert (cfg.solver.base_lr, cfg.solver.reference_batch_size) == (0.02, 16)
    assert (cfg.solver.steps, cfg.solver.max_iter, cfg.solver.warmup_iters) == (
        [60000, 80000],
        90000,
        500,
    )
    task = DetectionTask.from_config(cfg)
    assert task.pretrained_backbone == cfg.model.pretrained
    task.pretrained_backbone = None  # no download here
    with torch.device("meta"):
        model = task.build_model()
    has_nl = "_nl" in path.stem
    assert (model.backbone.nonlocal_res4 is not None) == (
        path.stem.endswith("_nl") or path.stem.endswith("_backbone")
    )
    assert has_nl == any("nonlocal" in n for n, _ in model.named_parameters())
    want_classes = 2 if path.stem.startswith("keypoint") else 91
    assert model.roi_heads.box_predictor.cls_score.out_features == want_classes


def _config(**extra):
    from types import SimpleNamespace as NS

    return NS(
        task="detection",
        model=NS(
            name="maskrcnn_r50_fpn_nl",
            num_classes=91,
            pretrained="resnet50.pth",
            init_from="baseline.pth",
            freeze_bn=False,
            kwargs={"min_size": 800},
        ),
        data=NS(
            root="train2017",
            annotations="train.json",
            val_root=None,
            val_annotations="val.json",
            extra=extra,
        ),
    )


def test_config_translation_without_the_engine() -> None:
    task = DetectionTask.from_config(_config(flip_prob=0.25, contiguous_labels=True))
    assert task.model_name == "maskrcnn_r50_fpn_nl" and task.iou_types == ("bbox", "segm")
    assert (task.pretrained_backbone, task.init_from) == ("resnet50.pth", "baseline.pth")
    assert task.paths == {"train": ("train2017", "train.json"), "val": ("train2017", "val.json")}
    assert (task.flip_prob, task.contiguous_labels, task.model_kwargs) == (
        0.25,
        True,
        {"min_size": 800},
    )
    with pytest.raises(ValueError, match="flip_probability"):
        DetectionTask.from_config(_config(flip_probability=0.5))
    cfg = _config()
    cfg.model.freeze_bn = True
    with pytest.raises(ValueError, match="freeze_bn"):
        DetectionTask.from_config(cfg)
    cfg = _config()
    cfg.model.name = "maskrcnn_r18"
    with pytest.raises(ValueError, match="unknown detector"):
        DetectionTask.from_config(cfg)
