"""COCOeval through the detection task (Tables 5–6 metrics): perfect and degraded detections."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from nlnet.detection.data import collate_detection
from nlnet.detection.evaluation import coco_evaluate, detections_to_coco
from nlnet.detection.synthetic import make_shapes_coco
from nlnet.detection.task import DetectionTask

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


class Replay(nn.Module):
    """A stand-in detector that answers each image with prepared detections, in order."""

    def __init__(self, outputs: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, images):
        assert all(img.dim() == 3 for img in images)
        return [self.outputs.pop(0) for _ in images]


def _as_detections(dataset, shift: float = 0.0) -> list[dict[str, torch.Tensor]]:
    outs = []
    for i in range(len(dataset)):
        _, t = dataset[i]
        keep = t["iscrowd"] == 0
        n = int(keep.sum())
        det = {
            "boxes": t["boxes"][keep] + shift,
            "labels": t["labels"][keep],
            "scores": torch.linspace(0.9, 0.5, n),
        }
        if "masks" in t:
            masks = t["masks"][keep].float()[:, None]
            if shift:
                masks = torch.roll(masks, shifts=int(shift), dims=-1)
            det["masks"] = masks
        if "keypoints" in t:
            kp = t["keypoints"][keep].clone()
            kp[..., :2] += shift
            kp[..., 2] = 1.0
            det["keypoints"] = kp
        outs.append(det)
    return outs


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_coco(tmp_path_factory.mktemp("shapes"), num_images=3, seed=1)


@pytest.mark.parametrize("model_name", ["maskrcnn_r50_fpn_nl", "keypointrcnn_r50_fpn_nl_head"])
def test_perfect_detections_score_100_and_shifted_ones_less(tmp_path, shapes, model_name) -> None:
    image_dir, ann_file = shapes
    keypoints = model_name.startswith("keypoint")
    task = DetectionTask(
        model_name,
        val_images=str(image_dir),
        val_annotations=str(ann_file),
        contiguous_labels=keypoints,
    )
    ds = task.build_dataset("val")
    batches = [collate_detection([ds[0], ds[1]]), collate_detection([ds[2]])]
    metrics = task.evaluate(Replay(_as_detections(ds)), batches, torch.device("cpu"), tmp_path)
    types = ("bbox", "keypoints") if keypoints else ("bbox", "segm")
    for t in types:
        assert metrics[f"{t}/AP"] == pytest.approx(100.0), t
        assert metrics[f"{t}/AP50"] == pytest.approx(100.0), t
    assert metrics["images"] == 3.0
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == pytest.approx(metrics)
    records = json.loads((tmp_path / f"coco_results_{types[1]}.json").read_text())
    assert len(records) == sum(len(d["boxes"]) for d in _as_detections(ds))
    assert "Average Precision" in (tmp_path / "coco_eval.txt").read_text()

    worse = task.evaluate(Replay(_as_detections(ds, 6.0)), batches, torch.device("cpu"), None)
    for t in types:
        assert 0.0 <= worse[f"{t}/AP"] < 90.0, t


def test_results_format_and_empty_detections(shapes) -> None:
    from pycocotools.coco import COCO

    _, ann_file = shapes
    det = {
        "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]),
        "labels": torch.tensor([2]),
        "scores": torch.tensor([0.75]),
        "masks": torch.zeros(1, 1, 128, 128),
    }
    det["masks"][0, 0, 20:60, 10:30] = 0.9
    rec = detections_to_coco([det], [1], {2: 2})
    assert rec["bbox"][0]["bbox"] == [10.0, 20.0, 20.0, 40.0]
    assert rec["bbox"][0]["category_id"] == 2 and rec["bbox"][0]["score"] == pytest.approx(0.75)
    from pycocotools import mask as mask_utils

    assert mask_utils.area(rec["segm"][0]["segmentation"]) == 20 * 40
    with pytest.raises(ValueError, match="no COCO category"):
        detections_to_coco([det], [1], {1: 1})
    gt = COCO(str(ann_file))
    metrics, _ = coco_evaluate(gt, {"bbox": []}, iou_types=["bbox"])
    assert metrics["bbox/AP"] == 0.0
    with pytest.raises(ValueError, match="IoU type"):
        coco_evaluate(gt, {}, iou_types=["boxes"])


def _ddp_worker(rank: int, world: int, port: int, image_dir: str, ann_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        task = DetectionTask("maskrcnn_r50_fpn", val_images=image_dir, val_annotations=ann_file)
        ds = task.build_dataset("val")
        mine = list(range(rank, len(ds), world))  # this rank's share, as the engine's sampler
        dets = _as_detections(ds)
        replay = Replay([dets[i] for i in mine])
        batches = [collate_detection([ds[i]]) for i in mine]
        metrics = task.evaluate(
            replay, batches, torch.device("cpu"), Path(out) if rank == 0 else None
        )
        Path(out, f"rank{rank}.json").write_text(json.dumps(metrics))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_evaluation_gathers_every_rank(tmp_path, shapes) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    image_dir, ann_file = shapes
    mp.spawn(_ddp_worker, args=(2, port, str(image_dir), str(ann_file), str(tmp_path)), nprocs=2)
    m0 = json.loads((tmp_path / "rank0.json").read_text())
    m1 = json.loads((tmp_path / "rank1.json").read_text())
    assert m0 == m1  # every rank returns rank 0's result
    assert m0["images"] == 3.0 and m0["bbox/AP"] == pytest.approx(100.0)
    assert m0["segm/AP"] == pytest.approx(100.0)
    assert (tmp_path / "metrics.json").is_file()
