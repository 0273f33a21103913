"""configs/coco: every Table 5–6 recipe parses with the engine's schema and builds its detector."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nlnet.detection.task import DetectionTask

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "coco").glob("[!_]*.yaml"))


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
    config = pytest.importorskip("nlnet.config", reason="the engine's config schema is not here")
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
