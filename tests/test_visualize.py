"""``nlnet visualize``: config + checkpoint + (data set sample | video file) -> Figure 3 PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nlnet
from nlnet.cli import main
from nlnet.data.synthetic import ColourMatchDataset

pytest.importorskip("nlnet.engine.evaluate", reason="the training engine is not installed")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "demo" / "c2d_nl.yaml")
SMALL = ["data.extra.val_samples=8"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo NL model whose block is switched on (non-uniform attention), as a state dict."""
    torch.manual_seed(0)
    model = nlnet.create_model("demo_c2d_nl", num_classes=2)
    block = dict(model.named_modules())["res3.nonlocal0"]
    with torch.no_grad():
        for conv in (block.theta, block.phi, block.g, block.out):
            conv.weight.normal_(std=0.5)
        block.bn.weight.fill_(1.0)
    path = tmp_path_factory.mktemp("ck") / "weights.pt"
    torch.save(model.state_dict(), path)
    return path


def _size(path: Path) -> tuple[int, int]:
    img = Image.open(path)
    img.verify()
    assert img.format == "PNG"
    return img.size


def test_sample_arrows(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "fig.png"
    args = ["visualize", "--config", CONFIG, "--checkpoint", str(checkpoint), "--sample", "3"]
    assert main([*args, "--out", str(out), *SMALL]) == 0
    # 8 frames of 32 px + 7 gaps of 2 px, 4 output px per clip px (frames >= 128 px wide).
    assert _size(out) == ((8 * 32 + 7 * 2) * 4, 32 * 4)
    text = capsys.readouterr().out
    assert "val item 3" in text and "block res3.nonlocal0" in text
    assert "queries (8, 4, 4) -> keys (8, 2, 2)" in text  # res3 of the stride-4 demo net
    assert text.count("  query (") == 3  # --num-queries default


def test_explicit_queries_heatmap_and_frames(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "heat.png"
    rc = main(
        ["visualize", "--config", CONFIG, "--checkpoint", str(checkpoint), "--sample", "1",
         "--mode", "heatmap", "--queries", "0,10,10", "6,20,20", "--frames", "0", "6", "7",
         "--scale", "3", "--out", str(out), *SMALL]
    )  # fmt: skip
    assert rc == 0
    assert _size(out) == ((3 * 32 + 2 * 2) * 3, (2 * 32 + 2) * 3)


def test_video_file(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import av

    ds = ColourMatchDataset("val", val_samples=2)
    frames = (ds.render(ds.describe(1)).permute(1, 2, 3, 0).numpy() * 255).astype(np.uint8)
    frames = np.repeat(np.repeat(frames, 2, axis=1), 2, axis=2)  # 64 x 64: scaled back to 32
    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())
    out = tmp_path / "video.png"
    rc = main(
        ["visualize", "--config", CONFIG, "--checkpoint", str(checkpoint), "--video", str(video),
         "--num-queries", "2", "--out", str(out), "data.sampling_rate=1", *SMALL]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert _size(out) == ((8 * 32 + 7 * 2) * 4, 32 * 4)
    assert str(video) in capsys.readouterr().out


def test_list_blocks_and_errors(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    base = ["visualize", "--config", CONFIG, "--checkpoint", str(checkpoint), *SMALL]
    assert main([*base, "--list-blocks"]) == 0
    assert capsys.readouterr().out.strip() == "res3.nonlocal0"
    assert main([*base, "--block", "res4", "--out", str(tmp_path / "x.png")]) == 2
    assert "unknown block 'res4'" in capsys.readouterr().err
    assert main([*base, "--sample", "99", "--out", str(tmp_path / "x.png")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert (
        main([*base, "--video", str(tmp_path / "none.mp4"), "--out", str(tmp_path / "x.png")]) == 2
    )
    assert "video not found" in capsys.readouterr().err
    assert main([*base, "--queries", "0,40,40", "--out", str(tmp_path / "x.png")]) == 2
    assert "outside the clip" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
