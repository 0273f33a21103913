"""Self-describing weights, the settings check, container sniffing and frozen BN (issue 10).

Foreign checkpoints are built here from nlnet's own models with random non-trivial weights
(random BN statistics, NL γ ≠ 0, so no block is an identity), written in each project's file
layout, converted, rebuilt with ``create_model(weights=FILE)`` and compared logit for logit; each
is then loaded into a wrongly configured model, which must raise an error naming the setting.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import nlnet
from foreign import randomize, to_caffe2, to_mmaction2, to_slowfast
from nlnet.cli import main as cli_main
from nlnet.models import (
    CheckpointFormatError,
    FrozenBatchNorm,
    WeightsMismatchError,
    create_model,
    find_nonlocal_blocks,
    load_weights,
    read_checkpoint,
)
from nlnet.models.convert import convert_checkpoint
from nlnet.models.io import sniff

CLIP = (1, 3, 8, 64, 64)


def _logits(model: nn.Module) -> torch.Tensor:
    x = torch.randn(*CLIP, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model.eval()(x)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    rel = float((a - b).norm() / b.norm())
    assert rel <= 1e-5, rel


def _source(arch: str, **kw: object) -> nn.Module:
    model = randomize(create_model(arch, num_classes=10, **kw), seed=11)
    assert all(
        float(b.bn.weight.detach().abs().min()) > 0 for b in find_nonlocal_blocks(model).values()
    )
    return model


# -- convert → create_model(weights=FILE) → same logits; wrong settings → error -------------------
def test_pyslowfast_i3d_nln_8x8_roundtrip_and_the_issue_reproduction(tmp_path: Path) -> None:
    source = _source("i3d_r50_nl5", variant="slowfast")
    pyth = tmp_path / "I3D_NLN_8x8_R50.pyth"
    torch.save({"model_state": to_slowfast(source), "cur_epoch": 196}, pyth)
    dst = tmp_path / "i3d_nln_8x8.pth"
    argv = ["convert", str(pyth), str(dst), "--variant", "slowfast", "--classes", "kinetics400"]
    with pytest.raises(ValueError, match="400 class names given for a 10-class model"):
        convert_checkpoint("auto", pyth, dst, variant="slowfast", classes=["x"] * 400)
    assert cli_main(argv[:-2]) == 0
    model = create_model(weights=dst)  # no arch, no kwargs: the file says
    assert model.pretrained_cfg["arch"] == "i3d_r50_nl5"
    assert model.pretrained_cfg["model_kwargs"]["variant"] == "slowfast"
    assert model.pretrained_cfg["num_classes"] == 10
    _close(_logits(model), _logits(source))

    # The bug of issue 10: the 8x8 recipe's variant: speed model. Every key matches, yet the
    # logits would differ; now each path says which setting is wrong.
    speed = create_model("i3d_r50_nl5", num_classes=10, variant="speed")
    assert speed.state_dict().keys() == source.state_dict().keys()
    for weights in (dst, pyth):  # the converted file, and the raw PySlowFast file
        with pytest.raises(WeightsMismatchError, match=r"variant: the weights need") as err:
            load_weights(speed, weights)
        assert "'speed'" in str(err.value) and "model.kwargs.variant" in str(err.value)
        assert err.value.differences[0][0] == "variant"
    with pytest.raises(WeightsMismatchError, match="variant"):
        create_model("i3d_r50_nl5", weights=dst, variant="speed")
    with pytest.raises(WeightsMismatchError, match="variant"):
        create_model("i3d_r50_nl5", pretrained=dst, num_classes=10, variant="speed")
    with pytest.raises(WeightsMismatchError, match="arch"):
        create_model("c2d_r50_nl5", weights=dst)


def test_pyslowfast_c2d_nopool_arch_from_the_cfg_or_required(tmp_path: Path) -> None:
    source = _source("c2d_r50", variant="slowfast_nopool")
    sd = to_slowfast(source)
    bare = tmp_path / "C2D_NOPOOL_8x8_R50.pyth"
    torch.save({"model_state": sd}, bare)
    with pytest.raises(ValueError, match=r"--variant \{slowfast,slowfast_nopool\}"):
        convert_checkpoint("slowfast", bare, tmp_path / "x.pth")  # the name is not evidence
    with_cfg = tmp_path / "renamed.pyth"
    cfg = "MODEL:\n  ARCH: c2d_nopool\n  NUM_CLASSES: 10\nTRAIN:\n  BATCH_SIZE: 64\n"
    torch.save({"model_state": sd, "cfg": cfg}, with_cfg)
    dst = tmp_path / "c2d_nopool.pth"
    conv, _, _ = convert_checkpoint("auto", with_cfg, dst)
    assert conv.model_kwargs == {"variant": "slowfast_nopool"} and conv.arch == "c2d_r50"
    model = create_model(weights=dst)
    assert model.pool2 is None
    _close(_logits(model), _logits(source))
    # ... and the pooled C2D differs (the setting matters).
    pooled = create_model("c2d_r50", num_classes=10, variant="slowfast")
    load_weights(pooled, with_cfg, check_settings=False)
    assert float((_logits(pooled) - _logits(source)).norm() / _logits(source).norm()) > 1e-3
    with pytest.raises(WeightsMismatchError, match="slowfast_nopool"):
        load_weights(pooled, with_cfg)
    with pytest.raises(WeightsMismatchError, match=r"MODEL\.ARCH"):
        convert_checkpoint("slowfast", with_cfg, None, variant="slowfast")


@pytest.mark.parametrize(
    ("variant", "wrong"),
    [("speed", "original"), pytest.param("original", "speed", marks=pytest.mark.slow)],
    ids=["8x8", "32x2"],
)
def test_caffe2_release_roundtrip(tmp_path: Path, variant: str, wrong: str) -> None:
    source = _source("i3d_r50_nl5", variant=variant)
    pkl = tmp_path / "model.pkl"
    pkl.write_bytes(pickle.dumps({"blobs": to_caffe2(source)}, protocol=2))
    dst = tmp_path / "converted.pth"
    conv, _, _ = convert_checkpoint("caffe2", pkl, dst, variant=variant)
    assert conv.arch == "i3d_r50_nl5" and conv.model_kwargs == {"variant": variant, "norm": "batch"}
    model = create_model(weights=dst)
    _close(_logits(model), _logits(source))
    bad = create_model("i3d_r50_nl5", num_classes=10, variant=wrong)
    with pytest.raises(WeightsMismatchError, match=f"variant: the weights need '{variant}'"):
        load_weights(bad, dst)
    bad_nl = create_model("i3d_r50_nl5", num_classes=10, variant=variant, pool_before_conv=False)
    with pytest.raises(WeightsMismatchError, match="pool_before_conv"):
        load_weights(bad_nl, pkl)  # the raw .pkl implies the Caffe2 block (pool before φ/g)
    with pytest.raises(WeightsMismatchError, match="variant"):  # no Caffe2 model has it
        load_weights(create_model("i3d_r50_nl5", num_classes=10, variant="mmaction2"), pkl)


def test_mmaction2_roundtrip(tmp_path: Path) -> None:
    settings = {"variant": "mmaction2", "pool_before_conv": False, "scale": 1.0}
    source = _source("i3d_r50_nl5", **settings)
    with torch.no_grad():  # mmcv's conv_out has no bias
        for block in find_nonlocal_blocks(source).values():
            block.out.bias.zero_()
    pth = tmp_path / "i3d_nl_embedded_gaussian_20200813-6e6aef1b.pth"
    torch.save({"meta": {"epoch": 100}, "state_dict": to_mmaction2(source)}, pth)
    dst = tmp_path / "converted.pth"
    convert_checkpoint("auto", pth, dst, pairwise="embedded_gaussian")
    model = create_model(weights=dst)
    _close(_logits(model), _logits(source))
    bad = create_model("i3d_r50_nl5", num_classes=10, variant="mmaction2", scale=1.0)
    with pytest.raises(WeightsMismatchError, match="pool_before_conv") as err:
        load_weights(bad, pth)  # raw mmaction2 dict: mmcv pools after φ/g
    assert "pool_before_conv=False" in str(err.value)
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(create_model("i3d_r50_nl5", num_classes=10, variant="mmaction2"), dst)
    assert [d[0] for d in err.value.differences] == ["scale", "pool_before_conv"]
    # A self-describing file checks every setting, the ones its layout leaves open too.
    dot = create_model("i3d_r50_nl5", num_classes=10, **settings, pairwise="dot_product")
    load_weights(dot, pth)  # raw: embedded_gaussian or dot_product, the file cannot tell
    with pytest.raises(WeightsMismatchError, match="pairwise"):
        load_weights(dot, dst)


@pytest.mark.slow
def test_caffe2_affine_model_detects_frozen_bn_and_groups(tmp_path: Path) -> None:
    source = create_model("c2d_r50_nl5", num_classes=10, freeze_bn=True, temporal_groups={3: 4})
    randomize(source, seed=4)
    blobs = to_caffe2(source)
    pkl = tmp_path / "affine.pkl"
    pkl.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))
    dst = tmp_path / "affine.pth"
    conv, _, _ = convert_checkpoint("caffe2", pkl, dst, variant="original")
    assert conv.model_kwargs == {
        "variant": "original",
        "freeze_bn": True,
        "norm": None,
        "temporal_groups": {3: 4},
    }
    x = torch.randn(1, 3, 32, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _close(create_model(weights=dst).eval()(x), source.eval()(x))


def test_create_model_weights_options(tmp_path: Path) -> None:
    source = _source("c2d_r50_nl1", variant="speed")
    pkl = tmp_path / "c2d.pkl"
    pkl.write_bytes(pickle.dumps({"blobs": to_caffe2(source)}, protocol=2))
    dst = tmp_path / "c2d.pth"
    convert_checkpoint("caffe2", pkl, dst, variant="speed", source="https://example/c2d.pkl")
    model = nlnet.create_model(weights=str(dst), num_classes=3)  # a new classifier
    assert model.head.fc.out_features == 3 and "classifier keeps its init" in str(model.load_report)
    assert model.pretrained_cfg["source"] == "https://example/c2d.pkl"
    with pytest.raises(FileNotFoundError):
        create_model(weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="do not name their model"):
        create_model(weights=to_caffe2(source))
    # A plain state dict with the name given works; explicit keywords win over nothing.
    plain = create_model("c2d_r50_nl1", num_classes=10, variant="speed")
    plain.load_state_dict(source.state_dict())
    again = create_model("c2d_r50_nl1", weights={"model": plain.state_dict()}, variant="speed")
    _close(_logits(again), _logits(source))


def test_trainer_checkpoint_is_self_describing(tmp_path: Path) -> None:
    from nlnet.config import load_config
    from nlnet.engine.checkpoint import weights_metadata
    from nlnet.engine.classification import ClassificationTask
    from nlnet.engine.evaluate import load_for_eval
    from nlnet.io import atomic_save

    overrides = [
        "model.name=c2d_r50_nl1",
        "model.num_classes=4",
        "model.kwargs.variant=speed",
        "data.classes=[a,b,c,d]",
    ]
    cfg = load_config(None, overrides)
    model = ClassificationTask(cfg).build_model()
    meta = weights_metadata(cfg, model)
    assert meta["arch"] == "c2d_r50_nl1" and meta["num_classes"] == 4
    assert meta["model_kwargs"]["variant"] == "speed" and meta["classes"] == ["a", "b", "c", "d"]
    assert meta["preprocessing"]["mean"] == [114.75] * 3
    ckpt = tmp_path / "iter_00000010.pt"
    atomic_save({**meta, "nlnet_checkpoint": 1, "model": model.state_dict()}, ckpt)
    rebuilt = create_model(weights=ckpt)
    assert rebuilt.pretrained_cfg["classes"] == ["a", "b", "c", "d"]
    # nlnet eval / visualize with a config of another layout: refused, naming the setting.
    other = ClassificationTask(load_config(None, overrides[:2])).build_model()
    with pytest.raises(WeightsMismatchError, match="variant"):
        load_for_eval(other, ckpt)
    load_for_eval(ClassificationTask(cfg).build_model(), ckpt)  # the right one loads
    # A released-weights name resolves through the hub to its cached file (here: ckpt).
    from nlnet.models import hub

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hub, "resolve_weights", lambda spec, **kw: ckpt if spec == "x.tag" else None)
        with pytest.raises(WeightsMismatchError, match="variant"):
            load_for_eval(other, "x.tag")
        load_for_eval(ClassificationTask(cfg).build_model(), "x.tag")
    # model.init_from refuses too, unless told it is on purpose.
    init = load_config(None, [*overrides[:2], f"model.init_from={ckpt}"])
    with pytest.raises(WeightsMismatchError, match="init_check_settings"):
        ClassificationTask(init).build_model()
    init = load_config(
        None, [*overrides[:2], f"model.init_from={ckpt}", "model.init_check_settings=false"]
    )
    ClassificationTask(init).build_model()


def test_eval_cli_refuses_a_converted_model_of_another_layout(tmp_path: Path, capsys) -> None:
    """``nlnet eval configs/kinetics/i3d_r50_nl5_8x8.yaml --checkpoint <PySlowFast converted>``."""
    from nlnet.engine.evaluate import load_for_eval

    source = create_model("i3d_r50_nl5", num_classes=400, variant="slowfast", device="meta")
    sd = {k: torch.zeros(v.shape) for k, v in to_slowfast(source).items()}
    dst = tmp_path / "i3d_nln.pth"
    convert_checkpoint("slowfast", {"model_state": sd}, dst, variant="slowfast")
    from nlnet.config import load_config
    from nlnet.engine.classification import ClassificationTask

    cfg = load_config("configs/kinetics/i3d_r50_nl5_8x8.yaml", ["model.num_classes=400"])
    with pytest.raises(WeightsMismatchError, match="variant: the weights need 'slowfast'"):
        load_for_eval(ClassificationTask(cfg).build_model(), dst)


# -- container sniffing ------------------------------------------------------------------------
def _blob_pickle() -> bytes:
    return pickle.dumps({"blobs": {"conv1_w": np.ones((2, 3, 1, 7, 7), np.float32)}}, protocol=2)


def test_container_sniffing_names_what_the_file_is(tmp_path: Path) -> None:
    good = tmp_path / "good.pkl"
    good.write_bytes(_blob_pickle())
    assert sniff(good) == "pickle" and "blobs" in read_checkpoint(good)

    gz = tmp_path / "C2D_NOPOOL_8x8_R50.pkl"  # a gzip that calls itself .pkl
    gz.write_bytes(gzip.compress(_blob_pickle()))
    with pytest.raises(CheckpointFormatError, match=r"gzip-compressed \(a pickle inside\)"):
        read_checkpoint(gz)

    tgz = tmp_path / "pretrained_model.pkl"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("r50_pretrain_c2_model_iter450450_clean.pkl")
        data = _blob_pickle()
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    tgz.write_bytes(buf.getvalue())
    with pytest.raises(CheckpointFormatError, match=r"tar archive \(.tar.gz\).*r50_pretrain"):
        read_checkpoint(tgz)

    tar = tmp_path / "plain.pth"
    with tarfile.open(tar, "w") as tf:
        tf.add(good, arcname="inner.pkl")
    with pytest.raises(CheckpointFormatError, match=r"a tar archive holding \['inner.pkl'\]"):
        read_checkpoint(tar)

    z = tmp_path / "weights.pth"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointFormatError, match=r"zip archive \(not written by torch\.save"):
        read_checkpoint(z)

    as_int = tmp_path / "int.pkl"
    as_int.write_bytes(pickle.dumps(7, protocol=2))
    with pytest.raises(CheckpointFormatError, match=r"holds a int .*not a dict of weights"):
        read_checkpoint(as_int)

    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(_blob_pickle()[:200])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
        read_checkpoint(truncated)

    torch_file = tmp_path / "model.pth"
    torch.save({"model": {"w": torch.ones(3)}}, torch_file)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(torch_file.read_bytes()[:300])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
        read_checkpoint(cut)

    html = tmp_path / "page.pkl"
    html.write_text("<!DOCTYPE html><html>Access denied</html>")
    with pytest.raises(CheckpointFormatError, match="HTML page"):
        read_checkpoint(html)
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="empty file"):
        read_checkpoint(empty)

    legacy = tmp_path / "legacy.bin"  # pre-1.6 torch.save: a pickle whose first object is an int
    torch.save({"model": {"w": torch.ones(3)}}, legacy, _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(legacy)["model"]["w"], torch.ones(3))
    # The CLI reports the container and exits non-zero.
    assert cli_main(["convert", str(gz), str(tmp_path / "o.pth"), "--variant", "speed"]) == 1


# -- frozen BN must not kill non-local blocks (issue 10, item 6) -------------------------------
def test_frozen_bn_keeps_the_nonlocal_bn_trainable() -> None:
    from nlnet.config import load_config
    from nlnet.engine.classification import ClassificationTask

    cfg = load_config(
        None,
        ["model.name=c2d_r50_nl1", "model.num_classes=3", "model.freeze_bn=true",
         "model.kwargs.norm=batch", "model.kwargs.variant=speed", "model.dropout=0"],
    )  # fmt: skip
    model = ClassificationTask(cfg).build_model().train()
    block = next(iter(find_nonlocal_blocks(model).values()))
    assert isinstance(block.bn, nn.BatchNorm3d) and block.bn.weight.requires_grad
    assert float(block.bn.weight.detach().abs().max()) == 0.0  # γ = 0: an identity at start
    assert isinstance(model.stem.bn, FrozenBatchNorm)
    assert not any(
        isinstance(m, nn.BatchNorm3d) for n, m in model.named_modules() if "nonlocal" not in n
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)  # the affines are 1/0: no normalisation
    x = torch.randn(2, 3, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 2])
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
    grads = {n: p.grad for n, p in block.named_parameters()}
    for name in ("theta.weight", "phi.weight", "g.weight", "out.weight", "bn.weight"):
        assert grads[name] is not None and bool(torch.isfinite(grads[name]).all()), name
        assert float(grads[name].abs().sum()) > 0, name


def test_a_weights_name_goes_to_the_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from nlnet.models import hub

    seen = []

    def fake_resolve(spec: str, **kwargs: object) -> Path:
        seen.append(spec)
        raise hub.OfflineError(f"{spec} is not cached")

    monkeypatch.setattr(hub, "resolve_weights", fake_resolve)
    with pytest.raises(hub.OfflineError, match="not cached"):
        create_model(weights="i3d_r50_nl5.orig_32x2_k400")
    assert seen == ["i3d_r50_nl5.orig_32x2_k400"]
    with pytest.raises(FileNotFoundError):
        create_model(weights="some/dir/missing.pth")
    assert seen == ["i3d_r50_nl5.orig_32x2_k400"]  # a path is never taken for a name


def test_every_registered_model_is_a_visible_function() -> None:
    import inspect

    from nlnet.models import zoo

    text = inspect.getsource(zoo)
    names = nlnet.list_models("c2d_r*") + nlnet.list_models("i3d_r*")
    assert len(names) == 16
    for name in names:
        assert f"\ndef {name}(" in text and getattr(zoo, name).__name__ == name
