"""End to end through the real pieces: generated H.264 videos in a folder-per-class layout, the
real data pipeline, a real registered model with a non-local block, the CLI's train → resume →
eval, with one broken video in each split."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from videos import make_video

pytestmark = pytest.mark.slow


def _dataset(root: Path, split: str, per_class: int) -> None:
    for c, name in enumerate(["archery", "bowling"]):
        for v in range(per_class):
            make_video(
                root / split / name / f"{name}_{v}.mp4",
                20 + 3 * v,
                fps=25,
                size=(64, 48),
                pattern="index" if c == 0 else "texture",
            )
    # A broken file listed by the folder layout: it must be logged, replaced in training and
    # reported by evaluation, not crash the run.
    (root / split / "bowling" / "broken.mp4").write_bytes(b"\x00not a video\x00" * 10)


def _nlnet(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nlnet", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("e2e")
    _dataset(tmp / "data", "train", 3)
    _dataset(tmp / "data", "val", 2)
    # demo_c2d_nl: a registered VideoResNet with a non-local block, small enough that the pipeline
    # under test dominates (c2d_r50_nl1, the same class at ResNet-50 width, is ~20 % slower here).
    cfg = {
        "model": {"name": "demo_c2d_nl", "num_classes": None, "dropout": 0.5, "init_from": None},
        "data": {
            "name": "folder",
            "root": str(tmp / "data/train"),
            "val_root": str(tmp / "data/val"),
            "clip_length": 8,
            "sampling_rate": 2,
            "crop_size": 48,
            "jitter": [48, 56],
            "test_scale": 48,
            "num_workers": 0,
        },
        "solver": {
            "base_lr": 0.01,
            "steps": [2],
            "max_iter": 2,
            "batch_size": 2,
            "reference_batch_size": 2,
        },
        "train": {
            "output_dir": str(tmp / "run"),
            "checkpoint_period": 2,
            "eval_period": 0,
            "log_period": 1,
            "precise_bn_batches": 1,
            "deterministic": True,
            "progress": False,
        },
        "eval": {"num_clips": 2, "test_crop": "center", "batch_size": 4, "num_workers": 0},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    first = _nlnet("train", str(path), cwd=tmp)
    # Resume from the last checkpoint and extend the schedule by two iterations.
    second = _nlnet("train", str(path), "solver.max_iter=3", cwd=tmp)
    ckpts = sorted((tmp / "run" / "checkpoints").glob("*.pt"))
    evaluation = _nlnet(
        "eval", str(path), "--checkpoint", str(ckpts[-1]), "--out", str(tmp / "eval"), cwd=tmp
    )
    return {"tmp": tmp, "first": first, "second": second, "eval": evaluation, "ckpts": ckpts}


def test_train_resume_eval_through_the_cli(run: dict) -> None:
    for key in ("first", "second", "eval"):
        proc = run[key]
        assert proc.returncode == 0, f"{key}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    names = [p.name for p in run["ckpts"]]
    assert any("00000003" in n for n in names), names
    state = torch.load(run["ckpts"][-1], map_location="cpu", weights_only=True)
    assert isinstance(state, dict)
    lines = [json.loads(x) for x in (run["tmp"] / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x.get("split") == "train"]
    assert [x["iteration"] for x in train] == [1, 2, 3]  # resumed at 3, nothing repeated
    losses = [x["loss"] for x in train]
    assert all(torch.isfinite(torch.tensor(losses))), losses


def test_eval_reports_the_unreadable_video(run: dict) -> None:
    metrics = json.loads((run["tmp"] / "eval" / "metrics.json").read_text())
    text = json.dumps(metrics)
    assert "broken.mp4" in text, text[:2000]
    # 2 classes × 2 readable videos + 1 unreadable, all scored exactly once.
    preds = (run["tmp"] / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 5
    assert (run["tmp"] / "run" / "missing_videos_train.txt").exists()
    assert metrics["num_videos"] == 5 and metrics["unreadable_videos"] == 1
    assert metrics["unreadable_video_ids"] == ["bowling/broken.mp4"]
    assert metrics["num_views"] == 5 * 2 and metrics["invalid_views"] == 2
    scored = [json.loads(x) for x in preds]
    correct = sum(p["readable"] and p["top5"][0] == p["target"] for p in scored)
    assert metrics["video_top1"] == pytest.approx(100.0 * correct / 5)
