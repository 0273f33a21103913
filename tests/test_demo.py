"""``nlnet demo --quick`` end to end (the CI smoke run), early stopping, and the demo models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import nlnet
from nlnet.block import NonLocalBlock

ROOT = Path(__file__).resolve().parents[1]


def test_demo_models() -> None:
    counts = {}
    for name in ("demo_c2d", "demo_c2d_nl", "demo_i3d"):
        model = nlnet.create_model(name, num_classes=2)
        counts[name] = sum(p.numel() for p in model.parameters())
        assert model(torch.randn(2, 3, 8, 32, 32)).shape == (2, 2)
    # The C2D + NL network is the C2D network plus exactly one block's parameters.
    block = NonLocalBlock(32)
    assert counts["demo_c2d_nl"] - counts["demo_c2d"] == sum(p.numel() for p in block.parameters())
    assert 77_000 < counts["demo_c2d"] < 78_000 and counts["demo_i3d"] > 1.6 * counts["demo_c2d"]
    nl = nlnet.create_model("demo_c2d_nl", num_classes=2)
    assert [n for n, m in nl.named_modules() if isinstance(m, NonLocalBlock)] == [
        "stages.1.nonlocal"
    ]
    with pytest.raises(ValueError, match="no released weights"):
        nlnet.create_model("demo_c2d", num_classes=2, pretrained="x.pt")


def test_c2d_frames_do_not_interact() -> None:
    """C2D's premise: a change in one frame changes the pooled features only through that
    frame, so the logit is additive over frames (what makes the task impossible for it)."""
    torch.manual_seed(0)
    c2d = nlnet.create_model("demo_c2d", num_classes=2).eval()
    nl = nlnet.create_model("demo_c2d_nl", num_classes=2).eval()
    with torch.no_grad():
        block = dict(nl.named_modules())["stages.1.nonlocal"]
        block.bn.weight.fill_(1.0)  # switch the (identity-initialised) block on
        for conv in (block.theta, block.phi, block.g, block.out):
            conv.weight.normal_(std=0.5)
        base = torch.randn(1, 3, 8, 32, 32)
        a, b = base.clone(), base.clone()
        a[:, :, 1] += torch.randn(1, 3, 32, 32)
        b[:, :, 6] += torch.randn(1, 3, 32, 32)
        both = a.clone()
        both[:, :, 6] = b[:, :, 6]
        for f, additive in ((c2d, True), (nl, False)):
            gap = f(both) - f(a) - f(b) + f(base)  # zero iff the effects of frames 1 and 6 add up
            assert (gap.abs().max() < 1e-4) == additive, gap


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("nlnet.engine.trainer", reason="the training engine is not installed")
    out = tmp_path_factory.mktemp("demo") / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "nlnet", "demo", "--quick", "--i3d", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "C2D + 1 NL block" in proc.stdout and "val top-1" in proc.stdout
    return out


@pytest.mark.slow
def test_quick_demo_writes_everything(quick_demo: Path) -> None:
    metrics = json.loads((quick_demo / "metrics.json").read_text())
    for key in ("baseline", "nonlocal", "i3d"):
        m = metrics[key]
        assert 0.0 <= m["val_top1"] <= 1.0 and 0.0 <= m["test_top1"] <= 1.0
        assert m["iterations"] == m["max_iter"] == 8 and not m["stopped_early"]
        run_dir = quick_demo / key
        assert (run_dir / "metrics.jsonl").is_file() and (
            run_dir / "test" / "metrics.json"
        ).is_file()
        # val_top1 is the engine's last validation record, as a fraction.
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert recs[-1]["split"] == "val" and recs[-1]["video_top1"] / 100 == m["val_top1"]
    assert metrics["i3d"]["params"] > metrics["nonlocal"]["params"] > metrics["baseline"]["params"]
    # Default optimiser: the engine's AdamW with the warm-up + cosine schedule (the recipes'
    # solver.optimizer/solver.schedule), saved in the checkpoint.
    ck = torch.load(next((quick_demo / "nonlocal" / "checkpoints").glob("*.pt")), weights_only=True)
    assert ck["schedule"]["kind"] == "cosine" and "exp_avg" in str(ck["optimizer"])
    assert ck["optimizer_kind"] == "adamw" and ck["config"]["train"]["stop_at_val_top1"] == 95.0
    assert metrics["quick"] is True and metrics["attention"]["block"] == "stages.1.nonlocal"
    for name in ("curves.png", "attention.png", "attention_heatmap.png"):
        img = Image.open(quick_demo / name)
        img.verify()
        assert img.format == "PNG" and min(img.size) > 100
    report = (quick_demo / "report.md").read_text()
    for link in ("curves.png", "attention.png", "attention_heatmap.png", "| C2D (`demo_c2d`)"):
        assert link in report


@pytest.mark.slow
def test_early_stopping(tmp_path: Path) -> None:
    pytest.importorskip("nlnet.engine.trainer", reason="the training engine is not installed")
    from nlnet.demo import QUICK_OVERRIDES, default_config_dir, train_one

    # Any accuracy reaches a target of 0: the engine's train.stop_at_val_top1 ends the run at
    # its first evaluation (iteration 4) and writes the checkpoint there.
    result = train_one(
        "baseline", default_config_dir(), tmp_path, QUICK_OVERRIDES, stop_at=0.0, optimizer="sgd"
    )
    assert result.stopped_early and result.iterations == 4 and result.max_iter == 8
    assert result.checkpoint.is_file() and "4" in result.checkpoint.name
    ck = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert ck["iteration"] == 4
    recs = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["iteration"]) for r in recs[-2:]] == [("val", 4), ("early_stop", 4)]
    # SGD: the engine's optimiser and step schedule were kept.
    assert "momentum_buffer" in str(ck["optimizer"]) and ck["schedule"].get("kind") is None
    assert ck["optimizer_kind"] == "sgd" and ck["config"]["solver"]["schedule"] == "step"


def test_demo_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nlnet.cli import main

    assert main(["demo", "--target", "1.5", "--out", str(tmp_path)]) == 2
    assert "--target" in capsys.readouterr().err
    pytest.importorskip("nlnet.engine.trainer", reason="the training engine is not installed")
    assert main(["demo", "--quick", "--configs", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


def test_auto_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from nlnet.demo import auto_threads

    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert auto_threads() == 4  # idle: every core
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert auto_threads() == 1  # three cores busy elsewhere
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert auto_threads() == 1  # never fewer than one
