"""``nlnet predict`` and ``nlnet extract-features`` on real H.264 videos (issue 10 item 4).

A small registered model with random (non-trivial) weights is saved in the self-describing
format with a small test protocol (3 clips × 3 crops of 32, 4 frames every 2); the videos have
different sizes, orientations and frame rates, one is shorter than a clip (indices wrap), one is
truncated and one is missing.  Every number is checked against a manual computation that decodes
the same views with the data pipeline's own functions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nlnet import create_model
from nlnet.classes import kinetics400
from nlnet.cli import main
from nlnet.data.transforms import eval_transform
from nlnet.data.video import VideoDecodeError, decode_frames, probe_video
from nlnet.models import VideoResNet
from nlnet.models.registry import MODELS, register_model
from nlnet.predict import (
    TestProtocol,
    _load,
    collect_inputs,
    infer_video,
    prefetch,
)
from videos import make_video, truncate

PRE = {
    "mean": [114.75] * 3,
    "std": [57.375] * 3,
    "frames": 4,
    "stride": 2,
    "test_scale": 64,
    "crop": 64,
    "clips": 3,
    "crops": 3,
}
VIEWS = 9


def tiny_resnet(num_classes: int = 400, **kwargs: Any) -> VideoResNet:
    """A narrow 4-stage VideoResNet with one NL block (res4 8×8 at a 256 crop → 2×2 windows)."""
    return VideoResNet(
        stage_blocks=(1, 1, 1, 1),
        stage_widths=(2, 4, 4, 8),
        stem_channels=4,
        nonlocal_blocks={4: [0]},
        pool2=None,
        num_classes=num_classes,
        **kwargs,
    )


class PlainNet(torch.nn.Module):
    """Not a VideoResNet: one conv, global mean, ``fc`` (the generic path; no NL block)."""

    def __init__(self, num_classes: int = 400) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.fc = torch.nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))


def plain_net(num_classes: int = 400, **kwargs: Any) -> PlainNet:
    return PlainNet(num_classes)


if "predict_test_resnet" not in MODELS:
    register_model("predict_test_resnet")(tiny_resnet)
if "predict_test_plain" not in MODELS:
    register_model("predict_test_plain")(plain_net)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and BN statistic random, so outputs depend on the input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif t.dim() == 1:
                t.copy_(0.5 * torch.randn(t.shape, generator=g) + (1.0 if "bn" in name else 0.0))
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    return model


def save_weights(path: Path, arch: str, pre: dict[str, Any], seed: int = 0, **extra: Any) -> Path:
    model = randomize(create_model(arch, num_classes=400), seed).eval()
    # logits of std ~2 on a random clip of the protocol's size: probabilities not saturated
    x = torch.randn(1, 3, pre["frames"], pre["crop"], pre["crop"])
    fc = model.head.fc if isinstance(model, VideoResNet) else model.fc
    with torch.no_grad():
        fc.weight.mul_(2.0 / float(model(x).std()))
    obj = {
        "format": "nlnet",
        "format_version": 1,
        "model": model.state_dict(),
        "arch": arch,
        "model_kwargs": {},
        "num_classes": 400,
        "classes": None,
        "preprocessing": pre,
        "converted_from": None,
        "source": None,
        "notes": [],
        **extra,
    }
    torch.save(obj, path)
    return path


def faststart_copy(src: Path, dst: Path) -> Path:
    """Remux ``src`` with the MP4 index first (``movflags=faststart``), as web videos are."""
    import av

    with av.open(str(src)) as i, av.open(str(dst), "w", options={"movflags": "faststart"}) as o:
        stream = i.streams.video[0]
        out = o.add_stream_from_template(stream)
        for packet in i.demux(stream):
            if packet.dts is None:
                continue
            packet.stream = out
            o.mux(packet)
    return dst


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Clip-sized convolutions: one thread is faster than two fighting on a busy machine."""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    v = root / "videos"
    out = {
        "a": make_video(v / "a.mp4", 30, 25, (64, 48)),  # landscape, 25 fps
        "b": make_video(v / "sub" / "b.mp4", 45, 30, (48, 80)),  # portrait, 30 fps
        "c": make_video(v / "c.mkv", 6, 12, (96, 54)),  # shorter than a clip: indices wrap
    }
    bad = make_video(root / "broken.mp4", 60, 25, (64, 48))
    out["broken"] = truncate(bad, 0.5)  # the index (moov) is lost: cannot be opened
    # the index survives, the frames do not: opens, fails while decoding
    fs = faststart_copy(make_video(root / "src.mp4", 60, 25, (64, 48)), root / "cut.mp4")
    out["cut"] = truncate(fs, 0.5)
    out["missing"] = root / "missing.mp4"
    out["folder"] = v
    out["root"] = root
    out["weights"] = save_weights(root / "tiny.pth", "predict_test_resnet", PRE)
    return out


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def manual_views(path: Path, pre: dict[str, Any], test_crop: str = "three") -> list[torch.Tensor]:
    """§4.2 views decoded by hand: clip k starts at floor(k·N/K), indices wrap modulo N."""
    info = probe_video(path)
    n = info.num_frames
    views = []
    for k in range(pre["clips"]):
        idx = [(k * n // pre["clips"] + j * pre["stride"]) % n for j in range(pre["frames"])]
        frames = decode_frames(info, idx)
        for v in range(pre["crops"] if test_crop == "three" else 1):
            views.append(
                eval_transform(
                    frames,
                    scale=pre["test_scale"],
                    test_crop=test_crop,
                    view=v,
                    crop_size=pre["crop"],
                    normalization="original",
                )
            )
    return views


def manual_probs(model: torch.nn.Module, views: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([torch.softmax(model(v[None]).double(), 1)[0] for v in views]).mean(0)


# -- predict ---------------------------------------------------------------------------------
def test_predict_json_top5_labels_and_per_file_errors(data, capsys) -> None:
    rc, out, err = run_cli(
        ["predict", data["folder"], data["broken"], data["cut"], data["missing"], "--weights",
         data["weights"], "--json", "--device", "cpu"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    report = json.loads(out)
    assert report["scored"] == 3 and report["failed"] == 3
    assert report["protocol"]["views"] == VIEWS and report["protocol"]["crop"] == 64
    assert report["test_head"] == "fully_conv"  # the release's head for a VideoResNet
    by_video = {Path(r["video"]).name: r for r in report["videos"]}
    names = kinetics400()
    for key in ("a.mp4", "b.mp4", "c.mkv"):
        r = by_video[key]
        assert "error" not in r and r["views"] == VIEWS
        preds = r["predictions"]
        assert len(preds) == 5
        for p in preds:
            assert p["label"] == names[p["index"]]
        probs = [p["probability"] for p in preds]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-9
    # the videos differ, so do their scores (the model is not input-blind)
    assert by_video["a.mp4"]["predictions"] != by_video["b.mp4"]["predictions"]
    assert "cannot open" in by_video["broken.mp4"]["error"]
    assert str(data["broken"]) in by_video["broken.mp4"]["error"]
    cut = by_video["cut.mp4"]["error"]
    assert str(data["cut"]) in cut and ("decoding failed" in cut or "truncated file?" in cut)
    assert "no such file" in by_video["missing.mp4"]["error"]
    assert "scored 3 of 6" in err


def test_predict_exit_code_nonzero_when_no_video_is_scored(data, capsys) -> None:
    rc, out, _ = run_cli(
        ["predict", data["broken"], data["missing"], "--weights", data["weights"], "--json"],
        capsys,
    )
    assert rc == 1
    assert [("error" in r) for r in json.loads(out)["videos"]] == [True, True]


@pytest.mark.slow
def test_predict_entry_point_exit_codes(data) -> None:
    """The real ``python -m nlnet`` process: exit 1 when nothing was scored, 0 otherwise
    (a shipped model: the test-registered ones do not exist in a new process)."""
    weights = save_weights(data["root"] / "demo.pth", "demo_c2d_nl", PRE)
    proc = subprocess.run(
        [sys.executable, "-m", "nlnet", "predict", str(data["broken"]), str(data["missing"]),
         "--weights", str(weights), "--json", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["scored"] == 0 and len(report["videos"]) == 2
    assert all("error" in r for r in report["videos"])
    proc = subprocess.run(
        [sys.executable, "-m", "nlnet", "predict", str(data["c"]), str(data["missing"]),
         "--weights", str(weights)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "scored 1 of 2" in proc.stderr


def test_predict_probabilities_equal_manual_computation(data, capsys) -> None:
    model, cfg = _load(data["weights"])
    model.eval()
    protocol = TestProtocol.from_preprocessing(cfg["preprocessing"])
    rc, out, _ = run_cli(
        ["predict", data["a"], data["b"], data["c"], "--weights", data["weights"], "--json",
         "--batch-size", "4"],
        capsys,
    )  # fmt: skip
    assert rc == 0
    report = {Path(r["video"]).name: r for r in json.loads(out)["videos"]}
    for key in ("a", "b", "c"):  # landscape, portrait (crops along the height), short
        ref = manual_probs(model, manual_views(data[key], PRE))
        got = infer_video(model, str(data[key]), protocol, batch_size=VIEWS).probs
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        assert abs(float(got.sum()) - 1) < 1e-6
        top = report[data[key].name]["predictions"]
        ref_p, ref_i = ref.topk(5)
        assert [p["index"] for p in top] == ref_i.tolist()
        np.testing.assert_allclose([p["probability"] for p in top], ref_p.numpy(), atol=1e-6)
    # one centre crop, and the whole frame (the paper's fully-convolutional test)
    for test_crop in ("center", "full"):
        p = TestProtocol.from_preprocessing(cfg["preprocessing"], test_crop=test_crop)
        ref = manual_probs(model, manual_views(data["b"], PRE, test_crop))
        got = infer_video(model, str(data["b"]), p, batch_size=2)
        assert got.views == PRE["clips"]
        torch.testing.assert_close(got.probs, ref, rtol=0, atol=1e-6)


def test_prefetch_order_errors_and_early_stop() -> None:
    import threading

    assert list(prefetch(iter(range(20)), 3)) == list(range(20))
    assert list(prefetch(iter(range(5)), 0)) == list(range(5))

    def failing():
        yield 1
        raise VideoDecodeError("x.mp4: corrupt")

    got = []
    with pytest.raises(VideoDecodeError, match="corrupt"):
        for item in prefetch(failing(), 2):
            got.append(item)
    assert got == [1]

    def alive() -> bool:
        return any(t.name == "nlnet-prefetch" and t.is_alive() for t in threading.enumerate())

    it = prefetch(iter(range(1000)), 2)
    assert next(it) == 0
    assert alive()
    it.close()  # the consumer stops early: the thread ends
    assert not alive()


def test_prefetched_views_give_the_same_scores(data, capsys) -> None:
    model, cfg = _load(data["weights"])
    model.eval()
    protocol = TestProtocol.from_preprocessing(cfg["preprocessing"])
    plain = infer_video(model, str(data["b"]), protocol, batch_size=2)
    ahead = infer_video(model, str(data["b"]), protocol, batch_size=2, prefetch_views=4)
    torch.testing.assert_close(ahead.probs, plain.probs, rtol=0, atol=0)
    with pytest.raises(VideoDecodeError, match=r"cut\.mp4"):
        infer_video(model, str(data["cut"]), protocol, prefetch_views=4)
    outs = []
    for extra in ([], ["--prefetch", "5"]):
        rc, out, _ = run_cli(
            ["predict", data["a"], data["cut"], "--weights", data["weights"], "--json", *extra],
            capsys,
        )
        assert rc == 0
        outs.append(json.loads(out)["videos"])
    assert outs[0] == outs[1]


def test_non_finite_scores_are_an_error_not_a_prediction(data, tmp_path: Path, capsys) -> None:
    obj = torch.load(data["weights"], weights_only=True)
    obj["model"]["head.fc.bias"][7] = float("nan")
    torch.save(obj, tmp_path / "nan.pth")
    rc, out, _ = run_cli(
        ["predict", data["a"], "--weights", tmp_path / "nan.pth", "--json"], capsys
    )
    assert rc == 1
    assert "not finite" in json.loads(out)["videos"][0]["error"]


def test_predict_text_output_and_protocol_overrides(data, capsys) -> None:
    rc, out, _ = run_cli(
        ["predict", data["a"], data["missing"], "--weights", data["weights"], "--clips", "2",
         "--crop", "24", "--test-crop", "center", "--top-k", "3"],
        capsys,
    )  # fmt: skip
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == f"{data['a']} (2 views)"
    assert len([ln for ln in lines if ln.startswith("  ")]) == 3
    assert any(ln.startswith("ERROR ") and str(data["missing"]) in ln for ln in lines)
    label = lines[1].split(None, 1)[1]
    assert label in kinetics400()


def test_usage_errors_exit_2(data, capsys) -> None:
    rc, _, err = run_cli(["predict", data["a"], "--weights", data["root"] / "nope.pth"], capsys)
    assert rc == 2 and "nope.pth" in err
    rc, _, err = run_cli(["predict", "--weights", data["weights"]], capsys)
    assert rc == 2 and "no videos" in err
    rc, _, err = run_cli(
        ["predict", data["a"], "--weights", data["weights"], "--crop", "64", "--scale", "32"],
        capsys,
    )
    assert rc == 2 and "crop 64" in err
    plain = save_weights(data["root"] / "plain.pth", "predict_test_plain", PRE)
    rc, _, err = run_cli(
        ["predict", data["a"], "--weights", plain, "--test-head", "fully_conv"], capsys
    )
    assert rc == 2 and "VideoResNet" in err


def test_inputs_folders_lists_and_repeats(data, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    lst = tmp_path / "list.txt"
    rel = os.path.relpath(data["b"], tmp_path)
    lst.write_text(f"# a comment\n{data['a']} 3\n\n{rel}\n{data['missing']}\n")
    inputs = collect_inputs([str(data["folder"]), f"@{lst}", str(empty)], [str(lst)])
    paths = [Path(i.path).resolve() for i in inputs]
    assert paths[:3] == [data["a"].resolve(), data["c"].resolve(), data["b"].resolve()]
    assert [i.name for i in inputs[:3]] == ["a", "c", str(Path("sub") / "b")]
    assert paths[3] == data["missing"].resolve() and inputs[3].error is None
    assert inputs[4].error is not None and "no video files" in inputs[4].error
    assert len(inputs) == 5  # the list's repeats of folder videos and the second list are dropped


def test_protocol_from_preprocessing() -> None:
    p = TestProtocol.from_preprocessing(None)
    assert (p.frames, p.stride, p.clips, p.scale, p.crop, p.test_crop) == (
        32, 2, 10, 256, 256, "three",
    )  # fmt: skip
    assert p.num_views == 30 and p.mean == (114.75,) * 3
    p = TestProtocol.from_preprocessing({"mean": [1, 2, 3], "crops": 1}, crop=64, clips=2)
    assert (p.scale, p.crop, p.test_crop, p.num_views, p.mean) == (64, 64, "center", 2, (1, 2, 3))
    with pytest.raises(ValueError, match="clips must be a positive int"):
        TestProtocol.from_preprocessing(None, clips=0)
    with pytest.raises(ValueError, match="crops"):
        TestProtocol.from_preprocessing({"crops": 2})


def test_attention_figure_for_the_video(data, tmp_path: Path, capsys) -> None:
    png = tmp_path / "att.png"
    rc, out, err = run_cli(
        ["predict", data["a"], "--weights", data["weights"], "--json", "--attention", png],
        capsys,
    )
    assert rc == 0, err
    entry = json.loads(out)["videos"][0]
    assert entry["attention"] == str(png) and entry["attention_block"] == "res4.nonlocal0"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # several videos: one PNG each in a folder
    rc, out, _ = run_cli(
        ["predict", data["a"], data["c"], "--weights", data["weights"], "--json",
         "--attention", tmp_path / "figs"],
        capsys,
    )  # fmt: skip
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["a.png", "c.png"]
    plain = save_weights(tmp_path / "plain.pth", "predict_test_plain", PRE)
    rc, _, err = run_cli(["predict", data["a"], "--weights", plain, "--attention", png], capsys)
    assert rc == 2 and "non-local" in err


def test_fully_conv_head_through_predict(data, tmp_path: Path, capsys) -> None:
    """A VideoResNet at the release's 256 crop: res5 8×8 → 2×2 windows, softmax averaged."""
    from models.test_test_head import loop_reference

    pre = {**PRE, "test_scale": 256, "crop": 256, "clips": 2, "frames": 4, "stride": 3}
    weights = save_weights(tmp_path / "r.pth", "predict_test_resnet", pre, seed=3)
    model, _ = _load(weights)
    model.eval()
    rc, out, _ = run_cli(
        ["predict", data["b"], "--weights", weights, "--json", "--top-k", "400"], capsys
    )
    assert rc == 0, out
    report = json.loads(out)
    assert report["test_head"] == "fully_conv"
    got = torch.zeros(400, dtype=torch.float64)
    for p in report["videos"][0]["predictions"]:
        got[p["index"]] = p["probability"]
    views = manual_views(data["b"], pre)
    with torch.no_grad():
        refs = []
        for v in views:
            res5 = model.forward_features(v[None])["res5"]
            assert res5.shape[-2:] == (8, 8)
            refs.append(loop_reference(res5.double(), model.head.fc.weight.double(),
                                       model.head.fc.bias.double())[0])  # fmt: skip
    ref = torch.stack(refs).mean(0)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    rc, out, _ = run_cli(
        ["predict", data["b"], "--weights", weights, "--json", "--test-head", "global"], capsys
    )
    glob = json.loads(out)["videos"][0]["predictions"][0]
    assert json.loads(out)["test_head"] == "global"
    assert abs(glob["probability"] - float(ref[glob["index"]])) > 1e-7  # a different head


# -- extract-features ------------------------------------------------------------------------
def manual_features(model, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled res5 and res4 (= its NL block's output) features, averaged over the views."""
    feats, block = [], []
    with torch.no_grad():
        for v in views:
            f = model.forward_features(v[None])
            block.append(f["res4"].double().mean(dim=(2, 3, 4))[0])
            feats.append(f["res5"].double().mean(dim=(2, 3, 4))[0])
    return torch.stack(feats).mean(0), torch.stack(block).mean(0)


def test_extract_features_npy_values_and_errors(data, tmp_path: Path, capsys) -> None:
    out = tmp_path / "feats"
    rc, stdout, err = run_cli(
        ["extract-features", data["folder"], data["broken"], "--weights", data["weights"],
         "--out", out, "--block", "res4.nonlocal0", "--json"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    report = json.loads(stdout)
    assert report == json.loads((out / "index.json").read_text())
    assert report["scored"] == 3 and report["failed"] == 1
    model, _ = _load(data["weights"])
    model.eval()
    for key, name in (("a", "a"), ("b", "sub/b"), ("c", "c")):
        feats = np.load(out / f"{name}.npy")
        block = np.load(out / f"{name}.res4.nonlocal0.npy")
        assert feats.shape == (32,) and block.shape == (16,) and feats.dtype == np.float32
        ref_f, ref_b = manual_features(model, manual_views(data[key], PRE))
        np.testing.assert_allclose(feats, ref_f.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(block, ref_b.numpy(), rtol=1e-5, atol=1e-6)
    assert not list(out.glob("broken*"))
    assert next(r for r in report["videos"] if "error" in r)["video"] == str(data["broken"])


def test_features_of_a_model_without_head_module(data, tmp_path: Path, capsys) -> None:
    """Any classifier with an ``fc``: the features are its input, averaged over the views."""
    plain = save_weights(tmp_path / "plain.pth", "predict_test_plain", PRE, seed=5)
    rc, _, err = run_cli(
        ["extract-features", data["a"], "--weights", plain, "--out", tmp_path / "f"], capsys
    )
    assert rc == 0, err
    assert "global" in json.loads((tmp_path / "f" / "index.json").read_text())["test_head"]
    model, _ = _load(plain)
    model.eval()
    with torch.no_grad():
        ref = torch.stack(
            [torch.relu(model.conv(v[None])).double().mean(dim=(2, 3, 4))[0]
             for v in manual_views(data["a"], PRE)]
        ).mean(0)  # fmt: skip
    got = np.load(tmp_path / "f" / "a.npy")
    assert got.shape == (8,)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_extract_features_pt_full_block_maps(data, tmp_path: Path, capsys) -> None:
    out = tmp_path / "feats"
    rc, _, err = run_cli(
        ["extract-features", data["c"], "--weights", data["weights"], "--out", out,
         "--format", "pt", "--block", "res4.nonlocal0", "--block-pool", "none"],
        capsys,
    )  # fmt: skip
    assert rc == 0, err
    obj = torch.load(out / "c.pt", weights_only=True)
    assert obj["features"].shape == (32,) and obj["views"] == VIEWS
    maps = obj["blocks"]["res4.nonlocal0"]
    model, _ = _load(data["weights"])
    model.eval()
    views = manual_views(data["c"], PRE)
    with torch.no_grad():
        res4 = model.forward_features(views[0][None])["res4"]
    assert maps.shape == (VIEWS, *res4.shape[1:]) == (VIEWS, 16, 1, 4, 4)
    _, ref_b = manual_features(model, views)
    torch.testing.assert_close(maps.double().mean(dim=(0, 2, 3, 4)), ref_b, rtol=1e-5, atol=1e-6)
    # nothing scored → exit 1; unknown block → usage error 2
    rc, _, _ = run_cli(
        ["extract-features", data["missing"], "--weights", data["weights"], "--out", out],
        capsys,
    )
    assert rc == 1
    rc, _, err = run_cli(
        ["extract-features", data["c"], "--weights", data["weights"], "--out", out,
         "--block", "res9"],
        capsys,
    )  # fmt: skip
    assert rc == 2 and "res4.nonlocal0" in err
