"""The released-weights registry and its download → verify → convert → cache path.

No test reaches the internet: files the tests make are served by a local ``http.server`` on
127.0.0.1 and through ``file://`` URLs.  The checkpoints are Caffe2-layout pickles of a tiny
registered video ResNet (two stages, one non-local block) with non-trivial weights, so the
converted file can be checked against the source model's logits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import json
import pickle
import re
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from foreign import to_caffe2, to_mmaction2
from nlnet.classes import charades157, kinetics400
from nlnet.models import create_model, hub, list_models, register_model
from nlnet.models.convert import CONVERTERS, FORMATS
from nlnet.models.resnet import VideoResNet
from nlnet.models.zoo import TEMPORAL_VARIANTS

TINY = "hubtest_tiny"


def _tiny(
    num_classes: int = 400,
    variant: str = "original",
    norm: str | None = "batch",
    freeze_bn: bool = False,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Two bottleneck stages (res2 I3D, res3 C2D) and one NL block after res3 block 0."""
    layout = TEMPORAL_VARIANTS[variant]
    return VideoResNet(
        stage_blocks=(1, 1),
        stage_widths=(4, 8),
        temporal_kernels=[[3], [1]],
        stem_channels=8,
        stem_kernel=(3, 7, 7),
        stem_stride=(layout["stem_t_stride"], 2, 2),
        pool1=layout["pool1"],
        pool2=layout["pool2"],
        nonlocal_blocks={3: [0]},
        nonlocal_kwargs={"norm": norm},
        num_classes=num_classes,
        freeze_bn=freeze_bn,
        dtype=dtype,
    )


if TINY not in list_models():
    register_model(TINY)(_tiny)


# -- test checkpoints -------------------------------------------------------------------------
def _source_model(seed: int = 0) -> nn.Module:
    """The tiny model (speed layout, 3 classes) with random weights and BN statistics."""
    g = torch.Generator().manual_seed(seed)
    model = _tiny(num_classes=3, variant="speed")
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("bn.weight", "bn_a.weight", "bn_b.weight", "bn_c.weight")):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)  # NL BN γ ≠ 0: the block acts
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return model.eval()


def _caffe2_pickle(model: nn.Module) -> bytes:
    """The model as the original release's pickle (with its iteration, LR and momentum blobs)."""
    return pickle.dumps({"blobs": to_caffe2(model)}, protocol=2)


@pytest.fixture(scope="module")
def ckpt() -> tuple[nn.Module, bytes]:
    model = _source_model()
    return model, _caffe2_pickle(model)


# -- a local HTTP server ----------------------------------------------------------------------
class _Served:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.counts: Counter[str] = Counter()
        self.base = ""

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture
def server() -> Iterator[_Served]:
    state = _Served()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.counts[self.path] += 1
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path in state.truncate:  # the connection drops mid-body
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    state.base = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        yield state
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def _entry(url: str, **overrides: Any) -> hub.WeightsEntry:
    fields: dict[str, Any] = {
        "name": f"{TINY}.test_8x8_k3",
        "arch": TINY,
        "source": "original",
        "fmt": "caffe2",
        "url": url,
        "converter_options": {"variant": "speed"},
        "model_kwargs": {"variant": "speed", "norm": "batch"},
        "num_classes": 3,
        "classes": ("pour", "stir", "wait"),
        "frames": 8,
        "stride": 8,
    }
    fields.update(overrides)
    return hub.WeightsEntry(**fields)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _assert_same_logits(path: Path, source: nn.Module) -> dict[str, Any]:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model(ck["arch"], num_classes=ck["num_classes"], **ck["model_kwargs"])
    model.load_state_dict(ck["model"])
    x = torch.randn(
        2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    with torch.no_grad():
        want = source.double().eval()(x)
        got = model.double().eval()(x)
    source.float()
    assert want.abs().max() > 1e-3  # a non-trivial output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)
    return ck


# -- download → verify → convert → cache ------------------------------------------------------
def test_http_download_convert_and_cache(
    server: _Served, ckpt: tuple[nn.Module, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, data = ckpt
    server.files["/zoo/tiny_8x8.pkl"] = data
    entry = _entry(server.url("/zoo/tiny_8x8.pkl"), sha256=hashlib.sha256(data).hexdigest()[:8])
    monkeypatch.setitem(hub._ENTRIES, entry.name, entry)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cache = tmp_path / "torch" / "hub" / "checkpoints"

    path = hub.resolve_weights(entry.name, progress=False)
    assert path == cache / f"{entry.name}.nlnet.pth"
    assert server.counts["/zoo/tiny_8x8.pkl"] == 1
    assert (cache / "tiny_8x8.pkl").read_bytes() == data  # the publisher's file, verified
    ck = _assert_same_logits(path, source)
    assert ck["format"] == "nlnet" and ck["format_version"] == 1
    assert ck["arch"] == TINY and ck["num_classes"] == 3
    assert ck["model_kwargs"]["variant"] == "speed"
    assert ck["classes"] == ["pour", "stir", "wait"]
    assert ck["preprocessing"]["mean"] == [114.75] * 3 and ck["preprocessing"]["frames"] == 8
    assert ck["source"] == entry.url and ck["converted_from"] == "caffe2"

    # Second call: the cache, no request (and no network even if offline).
    assert hub.resolve_weights(entry.name, progress=False) == path
    assert hub.resolve_weights(entry.name, offline=True) == path
    assert server.counts["/zoo/tiny_8x8.pkl"] == 1
    # The registered URL resolves as its entry.
    assert hub.resolve_weights(entry.url, progress=False) == path
    assert server.counts["/zoo/tiny_8x8.pkl"] == 1


def test_file_url_download_and_convert(ckpt: tuple[nn.Module, bytes], tmp_path: Path) -> None:
    source, data = ckpt
    src = tmp_path / "publisher" / "tiny_8x8.pkl"
    src.parent.mkdir()
    src.write_bytes(data)
    cache = tmp_path / "cache"
    entry = _entry(src.as_uri())
    path = hub.resolve_weights(entry, progress=False, cache_dir=cache)
    assert path.parent == cache and (cache / "tiny_8x8.pkl").read_bytes() == data
    _assert_same_logits(path, source)
    # A plain (unregistered) file:// URL is downloaded once and returned as is.
    other = hub.resolve_weights(src.as_uri(), progress=False, cache_dir=tmp_path / "c2")
    assert other == tmp_path / "c2" / "tiny_8x8.pkl" and other.read_bytes() == data


def test_wrong_hash_is_refused_and_not_cached(
    server: _Served, ckpt: tuple[nn.Module, bytes], tmp_path: Path
) -> None:
    _, data = ckpt
    server.files["/zoo/tiny_8x8.pkl"] = data
    wrong = "0" * 8 if not hashlib.sha256(data).hexdigest().startswith("0" * 8) else "f" * 8
    entry = _entry(server.url("/zoo/tiny_8x8.pkl"), sha256=wrong)
    cache = tmp_path / "cache"
    with pytest.raises(hub.ChecksumError, match=f"does not start with the publisher's '{wrong}'"):
        hub.resolve_weights(entry, progress=False, cache_dir=cache)
    assert _files(cache) == []  # neither the download, a temporary, nor a converted file
    with pytest.raises(hub.ChecksumError):  # not cached: it is fetched (and refused) again
        hub.resolve_weights(entry, progress=False, cache_dir=cache)
    assert server.counts["/zoo/tiny_8x8.pkl"] == 2
    assert _files(cache) == []


def test_wrong_hash_in_url_name_with_check_hash(
    server: _Served, ckpt: tuple[nn.Module, bytes], tmp_path: Path
) -> None:
    _, data = ckpt
    good = hashlib.sha256(data).hexdigest()[:8]
    server.files[f"/m/tiny-{good}.pth"] = data
    server.files["/m/tiny-00000000.pth"] = data
    cache = tmp_path / "cache"
    path = hub.resolve_weights(
        server.url(f"/m/tiny-{good}.pth"), progress=False, cache_dir=cache, check_hash=True
    )
    assert path.read_bytes() == data
    with pytest.raises(hub.ChecksumError):
        hub.resolve_weights(
            server.url("/m/tiny-00000000.pth"), progress=False, cache_dir=cache, check_hash=True
        )
    assert _files(cache) == [f"tiny-{good}.pth"]


def test_interrupted_download_leaves_nothing(
    server: _Served, ckpt: tuple[nn.Module, bytes], tmp_path: Path
) -> None:
    _, data = ckpt
    server.files["/zoo/tiny_8x8.pkl"] = data
    server.truncate.add("/zoo/tiny_8x8.pkl")
    cache = tmp_path / "cache"
    with pytest.raises(hub.DownloadError, match=rf"interrupted: received {len(data) // 2} of"):
        hub.resolve_weights(
            _entry(server.url("/zoo/tiny_8x8.pkl")), progress=False, cache_dir=cache
        )
    assert _files(cache) == []


def test_missing_file_on_server_is_a_download_error(server: _Served, tmp_path: Path) -> None:
    with pytest.raises(hub.DownloadError, match="404"):
        hub.resolve_weights(_entry(server.url("/nope.pkl")), progress=False, cache_dir=tmp_path)
    assert _files(tmp_path) == []


def test_offline_empty_cache_names_the_file_and_place(
    server: _Served, ckpt: tuple[nn.Module, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, data = ckpt
    server.files["/zoo/tiny_8x8.pkl"] = data
    entry = _entry(server.url("/zoo/tiny_8x8.pkl"))
    cache = tmp_path / "cache"
    with pytest.raises(hub.OfflineError) as err:
        hub.resolve_weights(entry, offline=True, cache_dir=cache)
    msg = str(err.value)
    assert entry.url in msg and str(cache / "tiny_8x8.pkl") in msg
    monkeypatch.setenv("NLNET_OFFLINE", "1")  # the environment switch does the same
    with pytest.raises(hub.OfflineError):
        hub.resolve_weights(entry, cache_dir=cache)
    assert server.counts["/zoo/tiny_8x8.pkl"] == 0

    # Placing the publisher's file there is enough: it is converted without network.
    cache.mkdir()
    (cache / "tiny_8x8.pkl").write_bytes(data)
    path = hub.resolve_weights(entry, cache_dir=cache)
    _assert_same_logits(path, source)
    assert server.counts["/zoo/tiny_8x8.pkl"] == 0


def test_a_placed_file_with_a_wrong_hash_is_refused(
    ckpt: tuple[nn.Module, bytes], tmp_path: Path
) -> None:
    _, data = ckpt
    (tmp_path / "tiny_8x8.pkl").write_bytes(data[:-10] + b"0" * 10)
    entry = _entry("https://example.invalid/tiny_8x8.pkl", sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(hub.ChecksumError, match="delete the file"):
        hub.resolve_weights(entry, offline=True, cache_dir=tmp_path)
    assert not (tmp_path / entry.cached_name).exists()


def test_settings_that_differ_from_the_registry_are_refused(
    ckpt: tuple[nn.Module, bytes], tmp_path: Path
) -> None:
    _, data = ckpt
    (tmp_path / "tiny_8x8.pkl").write_bytes(data)
    # The file's NL block has BN statistics (norm="batch"); a registry entry saying otherwise
    # is refused and nothing converted is cached.
    entry = _entry(
        "https://example.invalid/tiny_8x8.pkl", model_kwargs={"variant": "speed", "norm": None}
    )
    with pytest.raises(hub.WeightsError, match="norm: file converts to 'batch', registry expects"):
        hub.resolve_weights(entry, offline=True, cache_dir=tmp_path)
    assert _files(tmp_path) == ["tiny_8x8.pkl"]


def test_stale_conversion_is_redone(ckpt: tuple[nn.Module, bytes], tmp_path: Path) -> None:
    source, data = ckpt
    (tmp_path / "tiny_8x8.pkl").write_bytes(data)
    entry = _entry("https://example.invalid/tiny_8x8.pkl", converter_options={"variant": "speed"})
    path = hub.resolve_weights(entry, offline=True, cache_dir=tmp_path)
    first = path.stat().st_mtime_ns
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["raw_sha256"] == hashlib.sha256(data).hexdigest()
    side["converter_options"] = {"variant": "original"}  # made by an older registry
    path.with_suffix(".json").write_text(json.dumps(side))
    path2 = hub.resolve_weights(entry, offline=True, cache_dir=tmp_path)
    assert path2 == path and path.stat().st_mtime_ns != first
    _assert_same_logits(path, source)


def test_tarball_member(server: _Served, tmp_path: Path) -> None:
    payload = pickle.dumps({"blobs": {"conv1_w": torch.randn(4, 3, 7, 7).numpy()}}, protocol=2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in (
            ("pretrained_model/readme.txt", b"hello"),
            ("pretrained_model/run_x/affine_model_400k.pkl", payload),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    server.files["/pretrained_model.tar.gz"] = buf.getvalue()
    entry = _entry(
        server.url("/pretrained_model.tar.gz"),
        kind="init",
        member="run_x/affine_model_400k.pkl",
        num_classes=None,
        classes=None,
    )
    path = hub.resolve_weights(entry, progress=False, cache_dir=tmp_path)
    assert path == tmp_path / "pretrained_model" / "run_x" / "affine_model_400k.pkl"
    assert path.read_bytes() == payload
    # Extracted once: later calls need neither the tarball's download nor the network.
    assert hub.resolve_weights(entry, offline=True, cache_dir=tmp_path) == path
    assert server.counts["/pretrained_model.tar.gz"] == 1
    missing = _entry(server.url("/pretrained_model.tar.gz"), kind="init", member="nope.pkl")
    with pytest.raises(hub.WeightsError, match=r"has no member 'nope\.pkl'.*affine_model_400k"):
        hub.resolve_weights(missing, progress=False, cache_dir=tmp_path)


def test_local_path_and_bad_specs(tmp_path: Path) -> None:
    f = tmp_path / "w.pth"
    f.write_bytes(b"x")
    assert hub.resolve_weights(f) == f
    assert hub.resolve_weights(str(f)) == f
    with pytest.raises(ValueError, match="is a directory"):
        hub.resolve_weights(tmp_path)
    with pytest.raises(ValueError, match=r"i3d_r50_nl5\.orig_32x2_k400"):
        hub.resolve_weights("i3d_r50_nl5.orig_32x2_k40", offline=True)
    with pytest.raises(ValueError, match="unknown weights 'nope'"):
        hub.get_weights("nope")


def test_unconvertible_entry_says_so() -> None:
    entry = hub.get_weights("i3d_r50.pysf_ptv_8x8_k400")
    assert not entry.convertible
    with pytest.raises(hub.WeightsError, match="no converter for the 'pytorchvideo' layout"):
        hub.resolve_weights(entry.name, offline=True)


# -- the registry itself ----------------------------------------------------------------------
# released-weights.md (the publishers' pages): file name -> (top-1, top-5).
PUBLISHED: dict[str, tuple[float, float | None]] = {
    "c2d_baseline_32x2_IN_pretrain_400k.pkl": (72.0, 90.0),
    "c2d_nonlocal_32x2_IN_pretrain_400k.pkl": (73.9, 91.0),
    "i3d_baseline_32x2_IN_pretrain_400k.pkl": (73.6, 90.8),
    "i3d_nonlocal_32x2_IN_pretrain_400k.pkl": (74.9, 91.6),
    "i3d_baseline_128x1_I3D_pretrain_400k.pkl": (75.2, 92.0),
    "i3d_nonlocal_128x1_I3D_pretrain_400k.pkl": (76.5, 92.7),
    "c2d_baseline_8x8_IN_pretrain_400k.pkl": (71.9, 90.0),
    "c2d_nonlocal_8x8_IN_pretrain_400k.pkl": (74.4, 91.4),
    "i3d_baseline_8x8_IN_pretrain_400k.pkl": (73.4, 90.9),
    "i3d_nonlocal_8x8_IN_pretrain_400k.pkl": (74.7, 91.6),
    "i3d_baseline_32x4_I3D_pretrain_400k.pkl": (75.5, 92.0),
    "i3d_nonlocal_32x4_I3D_pretrain_400k.pkl": (76.5, 92.6),
    "i3d_baseline_8x8_IN_pretrain_300k.pkl": (73.2, 90.8),
    "i3d_baseline_8x8_IN_pretrain_600k_4gpu.pkl": (73.0, 90.4),
    "i3d_baseline_8x8_IN_pretrain_300k_4gpu.pkl": (72.0, 90.1),
    "C2D_NOPOOL_8x8_R50.pkl": (67.2, 87.8),
    "I3D_8x8_R50.pkl": (73.5, 90.8),
    "I3D_NLN_8x8_R50.pkl": (74.0, 91.1),
    # PySlowFast projects/pytorchvideo/README.md (Kinetics-400 table)
    "C2D_8x8_R50.pyth": (71.46, 89.68),
    "I3D_8x8_R50.pyth": (73.27, 90.70),
    "i3d_imagenet-pretrained-r50-nl-dot-product_8xb8-32x2x1-100e_kinetics400-rgb_20220812-8e1f2148.pth": (
        74.80,
        92.07,
    ),
    "i3d_imagenet-pretrained-r50-nl-embedded-gaussian_8xb8-32x2x1-100e_kinetics400-rgb_20220812-afd8f562.pth": (
        74.73,
        91.80,
    ),
    "i3d_imagenet-pretrained-r50-nl-gaussian_8xb8-32x2x1-100e_kinetics400-rgb_20220812-0c5cbf5a.pth": (
        73.97,
        91.33,
    ),
    "i3d_imagenet-pretrained-r50_8xb8-32x2x1-100e_kinetics400-rgb_20220812-e213c223.pth": (
        73.47,
        91.27,
    ),
    "i3d_nl_embedded_gaussian_r50_32x2x1_100e_kinetics400_rgb_20200813-6e6aef1b.pth": (74.71, None),
    "i3d_nl_gaussian_r50_32x2x1_100e_kinetics400_rgb_20200815-17f84aa2.pth": (73.37, None),
    "i3d_nl_dot_product_r50_32x2x1_100e_kinetics400_rgb_20200814-7c30d5bb.pth": (73.92, None),
}


def test_registry_covers_every_released_model() -> None:
    classifiers = [e for e in hub.list_weights() if e.kind == "classifier"]
    assert sorted(e.filename for e in classifiers) == sorted(PUBLISHED)
    for e in classifiers:
        assert (e.top1, e.top5) == PUBLISHED[e.filename], e.name
    assert sum(e.source == "original" for e in classifiers) == 15
    inits = [e for e in hub.list_weights() if e.kind == "init"]
    assert {e.member for e in inits} >= {
        "r50_pretrain_c2_model_iter450450_clean.pkl",
        "run_i3d_baseline_400k/affine_model_400k.pkl",
        "run_i3d_baseline_400k_32f/affine_model_400k.pkl",
    }
    assert all(e.filename == "pretrained_model.tar.gz" for e in inits)


@pytest.mark.parametrize("entry", hub.RELEASED, ids=lambda e: e.name)
def test_registry_entry_is_self_consistent(entry: hub.WeightsEntry) -> None:
    assert entry.name.startswith(entry.arch + ".") and entry.arch in list_models()
    assert hub.get_weights(entry.name) is entry
    assert entry.fmt in hub.SOURCE_FORMATS and entry.url.startswith("https://")
    assert entry.filename.endswith(
        {"caffe2": (".pkl", ".tar.gz"), "slowfast": (".pyth",), "mmaction2": (".pth",)}.get(
            entry.fmt, (".pyth",)
        )
    )
    if entry.fmt == "mmaction2":  # torch.hub's HASH_REGEX reads the prefix from the name
        assert entry.sha256 == hub.hash_prefix_from_name(entry.filename)
        assert len(entry.sha256) == 8
    else:
        assert entry.sha256 is None  # no checksum published
    assert entry.convertible == (entry.kind == "classifier" and entry.fmt in FORMATS)
    if entry.convertible:
        inspect.signature(CONVERTERS[entry.fmt]).bind("file", **entry.converter_options)
        # the converter's own setting and the registry's agree
        for k in set(entry.converter_options) & set(entry.model_kwargs):
            assert entry.converter_options[k] == entry.model_kwargs[k]
    if entry.kind == "classifier":
        model = create_model(
            entry.arch, num_classes=entry.num_classes, device="meta", **entry.model_kwargs
        )
        assert sum(p.numel() for p in model.parameters()) > 20_000_000  # a real ResNet-50
        names = entry.class_names()
        assert names is not None and len(names) == entry.num_classes == 400
        pre = entry.preprocessing()
        assert pre is not None and set(pre) == {
            "mean", "std", "frames", "stride", "test_scale", "crop", "clips", "crops"
        }  # fmt: skip
        assert f"{pre['frames']}x{pre['stride']}" in entry.name
        assert pre["clips"] == 10 and pre["crops"] == 3 and pre["crop"] == 256
        want = (123.675, 116.28, 103.53) if entry.source == "mmaction2" else (114.75,) * 3
        assert tuple(pre["mean"]) == want
        assert entry.top1 is not None and entry.protocol and entry.licence
    else:
        assert entry.member and entry.preprocessing() is None
    json.dumps(entry.to_dict())


def test_original_layouts_follow_the_release() -> None:
    """8×8 / 32×4 files: speed layout; 32×2 / 128×1: original; 128×1 / 32×4: frozen BN."""
    for e in hub.list_weights("*.orig_*_k400*"):
        if e.kind != "classifier":
            continue
        speed = e.name.split(".")[1].startswith(("orig_8x8", "orig_32x4"))
        assert e.model_kwargs["variant"] == ("speed" if speed else "original"), e.name
        affine = e.name.split(".")[1].startswith(("orig_128x1", "orig_32x4"))
        assert e.model_kwargs.get("freeze_bn", False) == affine, e.name
        if affine and "_nl" in e.arch:
            assert e.model_kwargs["temporal_groups"] == {3: 4} and e.model_kwargs["norm"] is None
    assert hub.get_weights("c2d_r50.pysf_nopool_8x8_k400").model_kwargs["variant"] == (
        "slowfast_nopool"
    )
    assert TEMPORAL_VARIANTS["slowfast_nopool"]["pool2"] is None


# -- class names ------------------------------------------------------------------------------
def test_charades_class_names() -> None:
    names = charades157()
    assert len(names) == 157 == len(set(names))
    assert names[0] == "Holding some clothes" and names[8] == "Opening a door"
    assert names[156] == "Someone is eating something"
    assert all(n == n.strip() and n for n in names)
    assert len(kinetics400()) == 400


# -- the command ------------------------------------------------------------------------------
def test_cli_lists_and_downloads(
    capsys: pytest.CaptureFixture[str], ckpt: tuple[nn.Module, bytes], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from nlnet.cli import main

    assert main(["weights", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in listed] == [e.name for e in hub.RELEASED]
    assert main(["weights", "i3d_r50_nl5.*"]) == 0
    out = capsys.readouterr().out
    assert "i3d_r50_nl5.orig_32x2_k400" in out and "74.9" in out and "c2d_r50." not in out
    assert main(["weights", "nothing*"]) == 1

    _, data = ckpt
    entry = _entry("https://example.invalid/tiny_8x8.pkl")
    monkeypatch.setitem(hub._ENTRIES, entry.name, entry)
    args = ["weights", "download", entry.name, "--offline", "--cache-dir", str(tmp_path)]
    assert main(args) == 1
    assert "offline" in capsys.readouterr().err
    (tmp_path / "tiny_8x8.pkl").write_bytes(data)
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == f"{entry.name}: {tmp_path / entry.cached_name}"


# -- real-size entries, converted from Caffe2-layout files built here (slow) -----------------
def _random_weights(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial weights and BN statistics at a scale that keeps a deep ResNet finite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() == 1 and name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.25)
            elif t.dim() == 1:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (1.0 / fan_in) ** 0.5)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "frames", "size"),
    [
        # original layout, frozen BN; res3 has T=8: two groups of 4 frames
        ("i3d_r50_nl5.orig_128x1_k400", 64, 32),
        ("i3d_r50_nl5.pysf_8x8_k400", 8, 64),  # PySlowFast layout, NL with BN
        ("c2d_r50.pysf_nopool_8x8_k400", 8, 64),  # no temporal pool after res2
    ],
)
def test_registry_entry_converts_a_file_of_its_layout(
    name: str, frames: int, size: int, tmp_path: Path, one_thread: None
) -> None:
    entry = hub.get_weights(name)
    source = _random_weights(
        create_model(entry.arch, num_classes=400, **entry.model_kwargs), seed=3
    )
    (tmp_path / entry.filename).write_bytes(_caffe2_pickle(source))
    path = hub.resolve_weights(name, offline=True, cache_dir=tmp_path)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert ck["source"] == entry.url and ck["classes"] == kinetics400()
    assert ck["preprocessing"] == entry.preprocessing()
    for k, v in entry.model_kwargs.items():
        assert ck["model_kwargs"].get(k) == v, k
    model = create_model(ck["arch"], num_classes=ck["num_classes"], **ck["model_kwargs"])
    model.load_state_dict(ck["model"])
    x = torch.randn(1, 3, frames, size, size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = source.double()(x.double())
        got = model.double().eval()(x.double())
    assert want.std() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "i3d_r50_nl5.mmaction2_eg_32x2_k400",
        "i3d_r50_nl5.mmaction2_dot_32x2_k400",
        "i3d_r50_nl5.mmaction2_gauss_32x2_k400",
        "i3d_r50.mmaction2_32x2_k400",
    ],
)
def test_mmaction2_entries_convert_a_file_of_their_layout(
    name: str, tmp_path: Path, one_thread: None
) -> None:
    entry = hub.get_weights(name)
    source = _random_weights(
        create_model(entry.arch, num_classes=400, **entry.model_kwargs), seed=5
    )
    with torch.no_grad():
        for key, t in source.state_dict().items():
            if re.fullmatch(r"res\d\.nonlocal\d+\.out\.bias", key):
                t.zero_()
    buf = io.BytesIO()
    torch.save({"meta": {"epoch": 100}, "state_dict": to_mmaction2(source)}, buf)
    data = buf.getvalue()
    (tmp_path / entry.filename).write_bytes(data)
    # The test file is not the publisher's: give the copy of the entry the file's own prefix.
    mine = dataclasses.replace(entry, sha256=hashlib.sha256(data).hexdigest()[:8])
    with pytest.raises(hub.ChecksumError):  # the published prefix refuses this file
        hub.resolve_weights(entry, offline=True, cache_dir=tmp_path)
    path = hub.resolve_weights(mine, offline=True, cache_dir=tmp_path)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert ck["preprocessing"]["mean"] == [123.675, 116.28, 103.53]
    assert ck["converted_from"] == "mmaction2"
    model = create_model(ck["arch"], num_classes=ck["num_classes"], **ck["model_kwargs"])
    model.load_state_dict(ck["model"])
    x = torch.randn(1, 3, 16, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = source.double()(x.double())
        got = model.double().eval()(x.double())
    assert want.std() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
