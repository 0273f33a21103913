"""Converters (Caffe2 release, PySlowFast, mmaction2) and the restricted unpickler.

Source checkpoints are written here from each project's documented names and shapes
(``checkpoint-formats.md``), filled with random values from one of our models; converting them back
must give the same tensors and identical logits.  The non-local semantics each converter asks for
(pool before/after φ,g; softmax scale) are checked against hand-written references of the
source projects' blocks in float64.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foreign import randomize, to_caffe2, to_caffe2_names, to_mmaction2, to_slowfast
from nlnet import create_model
from nlnet.cli import main as cli_main
from nlnet.models import UnsafeCheckpointError, find_nonlocal_blocks, load_weights
from nlnet.models.convert import convert_caffe2, convert_checkpoint, convert_mmaction2
from nlnet.models.resnet import VideoResNet
from nlnet.models.weights import read_state_dict

CLIP = (1, 3, 32, 32, 32)  # T=32 keeps res3 at 4 frames (temporal groups of 4 fit)


def reference_nonlocal(
    x: Tensor,
    w: dict[str, Tensor],
    *,
    pool_before: bool,
    scale: float,
    pairwise: str = "embedded_gaussian",
    eps: float = 1e-5,
) -> Tensor:
    """Caffe2/PySlowFast (pool x, then φ, g) or mmcv (φ, g, then pool) non-local block, eval BN."""

    def conv(t: Tensor, k: str) -> Tensor:
        return F.conv3d(t, w[f"{k}.weight"], w.get(f"{k}.bias"))

    def pool(t: Tensor) -> Tensor:
        return F.max_pool3d(t, (1, 2, 2), (1, 2, 2))

    theta = conv(x, "theta")
    if pool_before:
        phi, g = conv(pool(x), "phi"), conv(pool(x), "g")
    else:
        phi, g = pool(conv(x, "phi")), pool(conv(x, "g"))
    b, c = theta.shape[:2]
    aff = theta.flatten(2).transpose(1, 2) @ phi.flatten(2)  # (B, Nq, Nk)
    if pairwise == "embedded_gaussian":
        aff = (aff * scale).softmax(-1)
    else:
        aff = aff / aff.shape[-1]
    y = (aff @ g.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, *x.shape[2:])
    z = conv(y, "out")
    z = F.batch_norm(
        z, w["bn.running_mean"], w["bn.running_var"], w["bn.weight"], w["bn.bias"], False, 0.0, eps
    )
    return x + z


def _block_weights(sd: dict[str, Tensor], rename: dict[str, str]) -> dict[str, Tensor]:
    return {ours: sd[src].double() for ours, src in rename.items() if src in sd}


def _logits(model: nn.Module, seed: int = 5) -> Tensor:
    x = torch.randn(*CLIP, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if not k.endswith("num_batches_tracked"):  # a counter Caffe2 does not keep
            assert torch.equal(sa[k], sb[k]), k


# -- Caffe2 -----------------------------------------------------------------------------------
def test_caffe2_roundtrip_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = randomize(create_model("i3d_r50_nl5", num_classes=400))
    src = tmp_path / "i3d_nonlocal_32x2_IN_pretrain_400k.pkl"
    src.write_bytes(pickle.dumps({"blobs": to_caffe2(source)}, protocol=2))
    dst = tmp_path / "out" / "i3d_r50_nl5.pth"
    argv = ["convert", "--from", "caffe2", str(src), str(dst), "--variant", "original"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "variant='original'" in out and "i3d_r50_nl5" in out  # the arch is inferred
    ckpt = torch.load(dst, weights_only=True)
    assert ckpt["arch"] == "i3d_r50_nl5" and ckpt["converted_from"] == "caffe2"
    assert ckpt["format"] == "nlnet" and ckpt["source"] == src.name
    model = create_model(ckpt["arch"], num_classes=ckpt["num_classes"], **ckpt["model_kwargs"])
    report = load_weights(model, dst, strict=True)
    assert report.complete
    _assert_same_state(model, source)
    torch.testing.assert_close(_logits(model), _logits(source), rtol=0, atol=0)
    # Without --variant: refused, naming the flag (the file name is never used).
    argv = ["convert", "--from", "caffe2", str(src), str(tmp_path / "x.pth")]
    assert cli_main(argv) == 1
    assert "--variant {original,speed,slowfast,slowfast_nopool}" in capsys.readouterr().out
    assert not (tmp_path / "x.pth").exists()


def small_i3d(**kw: object) -> VideoResNet:
    """A narrow bottleneck I3D with the R50 layout (NL after res3 blocks 1, 3 and res4 block 1)."""
    args: dict = {
        "stage_blocks": (2, 4, 2, 1),
        "stage_widths": (4, 8, 16, 8),
        "temporal_kernels": [[3, 3], [3, 1, 3, 1], [3, 1], [1]],
        "stem_channels": 8,
        "stem_kernel": (5, 7, 7),
        "nonlocal_blocks": {3: [1, 3], 4: [1]},
        "num_classes": 6,
    }
    args.update(kw)
    return VideoResNet(**args)


def test_caffe2_affine_128f_model_and_ignored_blobs() -> None:
    """The frozen-BN release models: only _bn_s/_bn_b, NL blocks without BN, res3 groups of 4."""
    source = randomize(
        small_i3d(
            freeze_bn=True,
            nonlocal_kwargs={"norm": None},
            nonlocal_stage_kwargs={3: {"temporal_groups": 4}},
        )
    )
    blobs = to_caffe2(source)
    assert not any(k.endswith(("_bn_rm", "_bn_riv")) for k in blobs)
    assert not any(k.startswith("nonlocal") and "_bn_" in k for k in blobs)
    conv = convert_caffe2({"blobs": blobs}, variant="original")
    assert conv.model_kwargs == {
        "variant": "original",
        "freeze_bn": True,
        "norm": None,
        "temporal_groups": {3: 4},
    }
    assert conv.ignored == sorted(
        ["lr", "model_iter", "nonlocal_conv4_1_theta_shape5d", "pred_w_momentum"]
    )
    model = small_i3d(
        freeze_bn=True,
        nonlocal_kwargs={"norm": conv.model_kwargs["norm"]},
        nonlocal_stage_kwargs={3: {"temporal_groups": 4}},
    )
    assert load_weights(model, conv.state_dict, strict=True).complete
    _assert_same_state(model, source)
    torch.testing.assert_close(_logits(model), _logits(source), rtol=0, atol=0)
    # The registry builds the same block settings from these kwargs.
    reg = create_model("i3d_r50_nl5", device="meta", **conv.model_kwargs)
    blocks = find_nonlocal_blocks(reg)
    assert [blocks[k].temporal_groups for k in sorted(blocks)] == [4, 4, None, None, None]
    assert all(b.norm is None for b in blocks.values()) and reg.freeze_bn


def test_caffe2_variant_is_never_taken_from_the_file_name_and_r101_positions(
    tmp_path: Path,
) -> None:
    source = create_model("c2d_r101_nl5", variant="speed", device="meta")
    names = [
        k for k in to_caffe2_names(source) if k.startswith("nonlocal") and k.endswith("_theta_w")
    ]
    assert names == [
        "nonlocal_conv3_1_theta_w",
        "nonlocal_conv3_3_theta_w",
        "nonlocal_conv4_6_theta_w",
        "nonlocal_conv4_13_theta_w",
        "nonlocal_conv4_20_theta_w",
    ]
    tiny = {
        "conv1_w": np.zeros((64, 3, 1, 7, 7), np.float32),
        "pred_w": np.zeros((4, 2048), np.float32),
    }
    for name in ("c2d_nonlocal_8x8_IN_pretrain_400k.pkl", "c2d_baseline_32x2_IN_pretrain_400k.pkl"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"blobs": tiny}, protocol=2))
        with pytest.raises(ValueError, match="--variant"):
            convert_caffe2(path)
        assert convert_caffe2(path, variant="speed").model_kwargs["variant"] == "speed"
    # A checkpoint converted for the wrong architecture: every bad key is named.
    blobs = to_caffe2(create_model("c2d_r50_nl5", num_classes=10))
    blobs["nonlocal_conv4_9_theta_w"] = blobs.pop("nonlocal_conv4_5_theta_w")
    with pytest.raises(ValueError, match=r"res4\.nonlocal9\.theta\.weight") as err:
        convert_checkpoint("caffe2", {"blobs": blobs}, None, "c2d_r50_nl5", variant="original")
    assert "res4.nonlocal5.theta.weight" in str(err.value)


# -- PySlowFast --------------------------------------------------------------------------------
def test_slowfast_roundtrip_and_block_semantics(tmp_path: Path) -> None:
    source = randomize(create_model("i3d_r50_nl5", variant="slowfast", num_classes=400))
    sd = to_slowfast(source)
    assert len(sd) == 385  # the documented key count of PySlowFast's I3D-NLN R50
    assert len(to_slowfast(create_model("i3d_r50", device="meta"))) == 320
    src = tmp_path / "I3D_NLN_8x8_R50.pyth"
    torch.save({"model_state": sd, "cur_epoch": 196}, src)
    with pytest.raises(ValueError, match="--variant"):
        convert_checkpoint("slowfast", src, None, "i3d_r50_nl5")  # c2d vs c2d_nopool unknown
    conv, report, model = convert_checkpoint("slowfast", src, None, variant="slowfast")
    assert conv.model_kwargs == {"variant": "slowfast", "norm": "batch"} and report.complete
    assert conv.arch == "i3d_r50_nl5"
    _assert_same_state(model, source)
    torch.testing.assert_close(_logits(model), _logits(source), rtol=0, atol=0)

    # The converted block computes PySlowFast's non-local: pool x before φ/g, scale d^-1/2.
    block = find_nonlocal_blocks(model)["res4.nonlocal3"].double().eval()
    pre = "s4.pathway0_nonlocal3"
    w = _block_weights(
        sd,
        {
            f"{x}.{p}": f"{pre}.conv_{x}.{p}"
            for x in ("theta", "phi", "g", "out")
            for p in ("weight", "bias")
        }
        | {f"bn.{k}": f"{pre}.bn.{k}" for k in ("weight", "bias", "running_mean", "running_var")},
    )
    x = torch.randn(
        2, 1024, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        torch.testing.assert_close(
            block(x), reference_nonlocal(x, w, pool_before=True, scale=512**-0.5)
        )


# -- mmaction2 ---------------------------------------------------------------------------------
def test_mmaction2_roundtrip_and_block_semantics(tmp_path: Path) -> None:
    settings = {"variant": "mmaction2", "pairwise": "embedded_gaussian", "pool_before_conv": False}
    source = create_model("i3d_r50_nl5", num_classes=400, scale=1.0, **settings)
    randomize(source)
    with torch.no_grad():  # mmcv's conv_out has no bias
        for block in find_nonlocal_blocks(source).values():
            block.out.bias.zero_()
    sd = to_mmaction2(source)
    assert not any(k.endswith("conv_out.conv.bias") for k in sd)
    src = tmp_path / "i3d_nl.pth"
    torch.save({"meta": {"epoch": 100}, "state_dict": sd}, src)
    with pytest.raises(ValueError, match="--pairwise"):
        convert_checkpoint("mmaction2", src, None, "i3d_r50_nl5")
    conv, report, model = convert_checkpoint(
        "auto", src, None, "i3d_r50_nl5", pairwise="embedded_gaussian"
    )
    assert conv.model_kwargs == {**settings, "scale": 1.0, "norm": "batch"}
    assert report.complete
    _assert_same_state(model, source)  # logits: see the small-network test below
    _check_mmcv_block(model, sd, "embedded_gaussian")


@pytest.mark.parametrize("pairwise", ["embedded_gaussian", "dot_product"])
def test_mmaction2_logits_on_a_small_network(pairwise: str) -> None:
    """The converter is layout-generic: a narrow I3D with mmcv non-local blocks."""

    def build(**nl: object) -> VideoResNet:
        return VideoResNet(
            stage_blocks=(2, 2, 2, 1),
            stage_widths=(4, 8, 128, 16),
            temporal_kernels=[[3, 3], [3, 1], [3, 1], [1]],
            stem_channels=8,
            stem_kernel=(5, 7, 7),
            pool1=((1, 3, 3), (2, 2, 2), (0, 1, 1)),
            nonlocal_blocks={3: [1], 4: [1]},
            nonlocal_kwargs=nl,
            num_classes=5,
        )

    scale = {"scale": 1.0} if pairwise == "embedded_gaussian" else {}
    source = randomize(build(pairwise=pairwise, pool_before_conv=False, **scale))
    with torch.no_grad():
        for block in find_nonlocal_blocks(source).values():
            block.out.bias.zero_()
    sd = to_mmaction2(source)
    conv = convert_mmaction2({"state_dict": sd}, pairwise=pairwise)
    kw = dict(conv.model_kwargs)
    assert kw.pop("variant") == "mmaction2"
    assert kw == {"pairwise": pairwise, "pool_before_conv": False, "norm": "batch", **scale}
    model = build(**kw)
    assert load_weights(model, conv.state_dict, strict=True).complete
    torch.testing.assert_close(_logits(model), _logits(source), rtol=0, atol=0)
    _check_mmcv_block(model, sd, pairwise, channels=32)


def _check_mmcv_block(
    model: nn.Module, sd: dict[str, Tensor], pairwise: str, channels: int = 512
) -> None:
    """The converted block computes mmcv's NonLocal3d: φ/g convs, then pool; use_scale=False."""
    block = find_nonlocal_blocks(model)["res3.nonlocal1"].double().eval()
    pre = "backbone.layer2.1.non_local_block"
    w = _block_weights(
        sd,
        {
            "theta.weight": f"{pre}.theta.conv.weight",
            "theta.bias": f"{pre}.theta.conv.bias",
            "phi.weight": f"{pre}.phi.0.conv.weight",
            "phi.bias": f"{pre}.phi.0.conv.bias",
            "g.weight": f"{pre}.g.0.conv.weight",
            "g.bias": f"{pre}.g.0.conv.bias",
            "out.weight": f"{pre}.conv_out.conv.weight",
        }
        | {
            f"bn.{k}": f"{pre}.conv_out.bn.{k}"
            for k in ("weight", "bias", "running_mean", "running_var")
        },
    )
    x = torch.randn(
        2, channels, 4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        got = block(x)
        torch.testing.assert_close(
            got, reference_nonlocal(x, w, pool_before=False, scale=1.0, pairwise=pairwise)
        )
        # ... and differs from the pool-before-conv block (the setting matters).
        pooled_first = reference_nonlocal(x, w, pool_before=True, scale=1.0, pairwise=pairwise)
        assert not torch.allclose(got, pooled_first)


def test_mmaction2_use_scale_flag() -> None:
    sd = to_mmaction2(create_model("i3d_r50_nl5", device="meta"))
    zeros = {k: torch.zeros(v.shape) for k, v in sd.items()}
    conv = convert_mmaction2({"state_dict": zeros}, pairwise="embedded_gaussian")
    assert conv.model_kwargs["scale"] == 1.0 and conv.model_kwargs["pool_before_conv"] is False
    assert any("use_scale" in n for n in conv.notes)


# -- untrusted files ----------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = {"blobs": {"conv1_w": np.zeros((64, 3, 1, 7, 7), np.float32), "x": _Evil(marker)}}
    data = pickle.dumps(payload, protocol=2)
    pickle.loads(pickle.dumps({"ok": 1}))  # sanity: the pickle module itself works
    path = tmp_path / "model.pkl"
    path.write_bytes(data)
    with pytest.raises(UnsafeCheckpointError, match=r"exec"):
        read_state_dict(path)
    with pytest.raises(UnsafeCheckpointError):
        load_weights(create_model("c2d_r50", device="meta"), path)
    assert cli_main(["convert", str(path), str(tmp_path / "o.pth"), "--variant", "speed"]) == 1
    assert not marker.exists()
    assert not (tmp_path / "o.pth").exists()
    # The same object in a torch file is refused by weights_only=True.
    torch_path = tmp_path / "model.pth"
    with open(torch_path, "wb") as f:
        torch.save({"model": {"w": torch.zeros(1)}, "x": _Evil(marker)}, f)
    with pytest.raises(UnsafeCheckpointError, match="weights_only"):
        read_state_dict(torch_path)
    assert not marker.exists()
    # Sanity check that the payload is live: an unrestricted load would run it.
    pickle.loads(data)
    assert marker.read_text() == "pwned"
