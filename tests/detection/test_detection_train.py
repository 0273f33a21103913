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
def test_engine_training_lowers_the_loss_then_cocoeval_and_detect_run(tmp_path, shapes) -> None:
    """``nlnet train`` / ``nlnet eval``'s engine with the detection task, then ``nlnet detect``."""
    from nlnet.config import from_dict
    from nlnet.engine.evaluate import evaluate
    from nlnet.engine.trainer import Trainer

    image_dir, ann_file = shapes
    cfg = from_dict(
        {
            "task": "detection",
            "model": {"name": "maskrcnn_r50_fpn_nl", "num_classes": 4, "kwargs": TINY},
            "data": {
                "root": str(image_dir),
                "annotations": str(ann_file),
                "val_annotations": str(ann_file),
                "num_workers": 0,
                "extra": {"flip_prob": 0.0},
            },
            "solver": {
                # 0.002 spiked the loss by iteration 6 (17 → 6 → 15-32, fp32 and bf16 alike)
                "base_lr": 0.0005,
                "nesterov": False,
                "steps": [100],
                "max_iter": 6,
                "batch_size": 2,
                "reference_batch_size": 2,
            },
            "train": {
                "output_dir": str(tmp_path / "run"),
                "device": "cpu",
                "precise_bn_batches": 0,
                "checkpoint_period": 6,
                "eval_period": 6,
                "log_period": 1,
                "progress": False,
            },
            "eval": {"batch_size": 2, "num_workers": 0},
        }
    )
    torch.manual_seed(0)
    trainer = Trainer(cfg, task=DetectionTask.from_config(cfg))
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.run()

    # COCOeval ran on the trained model's detections at the end of the run.
    assert metrics["images"] == 4.0
    for key in ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP75"):
        assert 0.0 <= metrics[key] <= 100.0
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["iteration"] for r in log if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert {"loss_mask", "loss_classifier"} <= set(log[0]) and log[-1]["split"] == "val"

    # The loss on one fixed batch, with the same RPN/RoI sampling draws: before vs after.
    task = DetectionTask.from_config(cfg)
    train = task.build_dataset("train")
    batch = task.collate_fn()([train[(0, 0)], train[(1, 1)]])

    def probe(model: torch.nn.Module) -> float:
        model.train()
        torch.manual_seed(123)
        with torch.no_grad():
            return task.training_step(model, batch, torch.device("cpu"))[0].item()

    before_model = task.build_model()
    before_model.load_state_dict(initial)
    before, after = probe(before_model), probe(trainer.model)
    assert after < 0.85 * before, (before, after)
    assert trainer.model.backbone.nonlocal_res4.bn.weight.abs().sum() > 0  # the block learnt

    # nlnet eval: COCOeval on the checkpoint, metrics.json and COCO result files.
    ck = sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))[-1]
    out = tmp_path / "eval"
    result = evaluate(cfg, ck, out, split="val", task=DetectionTask.from_config(cfg))
    assert result == pytest.approx(metrics)
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    records = json.loads((out / "coco_results_segm.json").read_text())
    assert len(records) == 4 * TINY["box_detections_per_img"]

    # nlnet detect on the engine checkpoint: the detector's name and settings come from it.
    images = sorted(image_dir.glob("*.png"))[:2]
    drawn_dir = tmp_path / "drawn"
    args = ["detect", "--checkpoint", str(ck), *map(str, images), "--out", str(drawn_dir)]
    assert nlnet_main([*args, "--score-threshold", "0"]) == 0
    for img in images:
        drawn = read_rgb(drawn_dir / img.name)
        original = read_rgb(img)
        assert drawn.shape == original.shape and not torch.equal(drawn, original)
        dets = json.loads((drawn_dir / f"{img.stem}.json").read_text())
        assert len(dets) == TINY["box_detections_per_img"]
        assert {d["category"] for d in dets} <= {"box", "disc", "person"}  # from the JSON
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
