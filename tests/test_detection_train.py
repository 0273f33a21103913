"""The detection task end to end: training lowers the loss, COCOeval scores the result, and
``nlnet detect`` draws it.  R50 with random weights on 64-pixel images keeps this short."""

from __future__ import annotations

import json

import pytest
import torch

from nlnet.cli import main as nlnet_main
from nlnet.detection.data import read_rgb
from nlnet.detection.synthetic import make_shapes_coco
from nlnet.detection.task import DetectionTask

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Random weights: ordinary BatchNorm in the backbone (frozen BN would keep random statistics) and
# few RoIs per image so a step takes about a second on one CPU core.
TINY = {
    "min_size": 64,
    "max_size": 96,
    "backbone_norm": "batch",
    "trainable_backbone_layers": 0,
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_batch_size_per_image": 64,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 30,
    "box_batch_size_per_image": 32,
    "box_detections_per_img": 5,
    "box_score_thresh": 0.0,
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_coco(tmp_path_factory.mktemp("shapes"), num_images=4, seed=0)


def _task(name: str, shapes, **kw) -> DetectionTask:
    image_dir, ann_file = shapes
    return DetectionTask(
        name,
        train_images=str(image_dir),
        train_annotations=str(ann_file),
        val_images=str(image_dir),
        val_annotations=str(ann_file),
        **kw,
    )


@pytest.mark.slow
def test_training_lowers_the_loss_then_cocoeval_and_detect_run(tmp_path, shapes) -> None:
    task = _task("maskrcnn_r50_fpn_nl", shapes, num_classes=4, flip_prob=0.0, model_kwargs=TINY)
    torch.manual_seed(0)
    model = task.build_model()
    train = task.build_dataset("train")
    collate = task.collate_fn()
    batch = collate([train[(0, 0)], train[(1, 1)]])
    cpu = torch.device("cpu")

    def probe() -> float:
        # The same RPN/RoI sampling draws before and after training: only the weights differ.
        torch.manual_seed(123)
        with torch.no_grad():
            return task.training_step(model, batch, cpu)[0].item()

    model.train()
    before = probe()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.002, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(1)
    for _ in range(6):
        loss, scalars = task.training_step(model, batch, cpu)
        assert set(scalars) == {
            "loss",
            "loss_classifier",
            "loss_box_reg",
            "loss_mask",
            "loss_objectness",
            "loss_rpn_box_reg",
        }
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = probe()
    assert after < 0.85 * before, (before, after)
    # The non-local block is trained (its BN scale left zero).
    assert model.backbone.nonlocal_res4.bn.weight.abs().sum() > 0

    val = task.build_dataset("val")
    batches = [collate([val[0], val[1]]), collate([val[2], val[3]])]
    metrics = task.evaluate(model, batches, cpu, tmp_path / "eval")
    assert metrics["images"] == 4.0
    for key in ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP75"):
        assert 0.0 <= metrics[key] <= 100.0
    records = json.loads((tmp_path / "eval" / "coco_results_segm.json").read_text())
    assert len(records) == 4 * TINY["box_detections_per_img"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == pytest.approx(metrics)

    # An engine-style checkpoint: the detector's name and settings travel in its config.
    ck = tmp_path / "model.pt"
    config = {"model": {"name": "maskrcnn_r50_fpn_nl", "kwargs": TINY}, "data": {}}
    torch.save({"model": model.state_dict(), "config": config, "iteration": 6}, ck)
    image_dir, _ = shapes
    images = sorted(image_dir.glob("*.png"))[:2]
    out = tmp_path / "drawn"
    args = ["detect", "--checkpoint", str(ck), *map(str, images), "--out", str(out)]
    assert nlnet_main([*args, "--score-threshold", "0"]) == 0
    for img in images:
        drawn = read_rgb(out / img.name)
        original = read_rgb(img)
        assert drawn.shape == original.shape and not torch.equal(drawn, original)
        dets = json.loads((out / f"{img.stem}.json").read_text())
        assert len(dets) == TINY["box_detections_per_img"]
        assert all(d["category"] in ("box", "disc", "person") or d["label"] > 0 for d in dets)
    assert (
        nlnet_main(["detect", "--checkpoint", str(tmp_path / "no.pt"), "x.png", "--out", "o"]) == 2
    )


def test_keypoint_rcnn_training_step_reaches_every_block(shapes) -> None:
    kw = {**TINY, "box_batch_size_per_image": 8}
    task = _task(
        "keypointrcnn_r50_fpn_nl_head_backbone",
        shapes,
        flip_prob=1.0,
        contiguous_labels=True,
        model_kwargs=kw,
    )
    torch.manual_seed(0)
    model = task.build_model().train()
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    train = task.build_dataset("train")
    batch = task.collate_fn()([train[(0, 0)], train[(2, 1)]])
    loss, scalars = task.training_step(model, batch, torch.device("cpu"))
    assert torch.isfinite(loss) and scalars["loss_keypoint"] > 0
    loss.backward()
    blocks = [model.backbone.nonlocal_res4, *model.roi_heads.keypoint_head.nonlocal_blocks]
    for block in blocks:  # at identity, the gradient reaches the blocks through BN's scale
        assert block.bn.weight.grad is not None and block.bn.weight.grad.abs().sum() > 0
