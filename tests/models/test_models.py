"""Video ResNets (§4, Table 1–2): sizes, parameter counts, placement, inflation, loading, costs."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nlnet import NonLocalBlock, create_model, list_models
from nlnet.cli import main as cli_main
from nlnet.models import (
    FrozenBatchNorm,
    VideoResNet,
    find_nonlocal_blocks,
    freeze_batch_norm,
    load_weights,
)
from nlnet.models.flops import attention_flops, count_cost
from nlnet.models.weights import inflate_weight


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, random BN statistics, non-zero NL γ (so nothing is an identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith(("running_mean", ".bias")):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            elif t.dim() == 1:  # BN γ (also the NL blocks' γ = 0 at init)
                t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + 0.5)
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=gen) * (1.0 / fan_in) ** 0.5)
    return model


# -- registry and constructor arguments -------------------------------------------------------
def test_registry_names_and_unknown_kwargs() -> None:
    names = list_models()
    for depth in (50, 101):
        for n in (
            "c2d_r{}",
            "c2d_r{}_nl1",
            "c2d_r{}_nl5",
            "c2d_r{}_nl10",
            "i3d_r{}",
            "i3d_r{}_nl5",
        ):
            assert n.format(depth) in names
    with pytest.raises(TypeError, match="colour"):
        create_model("c2d_r50", colour="red", device="meta")
    with pytest.raises(ValueError, match="C2D model has no 3D kernels"):
        create_model("c2d_r50", inflate="3x3x3", device="meta")
    with pytest.raises(ValueError, match="variant"):
        create_model("i3d_r50", variant="fast", device="meta")
    with pytest.raises(ValueError, match="nonlocal_stage"):
        create_model("c2d_r50_nl5", nonlocal_stage=3, device="meta")
    with pytest.raises(ValueError, match=r"block indices must be in \[0, 4\)"):
        create_model("c2d_r50", nonlocal_blocks={3: [4]}, device="meta")


# Issue 3's numbers (PySlowFast's exact totals for the first four; 400 classes, NL convs with bias).
PARAMS = {
    "c2d_r50": 24.33e6,
    "c2d_r50_nl5": 31.69e6,
    "i3d_r50": 28.04e6,
    "i3d_r50_nl5": 35.40e6,
    "c2d_r101": 43.32e6,
    "c2d_r101_nl5": 50.68e6,
    "i3d_r101": 51.75e6,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts(name: str) -> None:
    model = create_model(name, num_classes=400, device="meta")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - PARAMS[name]) / PARAMS[name] < 0.005
    exact = {"c2d_r50_nl5": 31_686_096, "i3d_r50_nl5": 35_401_936, "i3d_r50": 28_043_472}
    if name in exact:
        assert n == exact[name]


def test_nonlocal_placement() -> None:
    def where(name: str, **kw: object) -> list[str]:
        return sorted(find_nonlocal_blocks(create_model(name, device="meta", **kw)))

    assert where("c2d_r50_nl1") == ["res4.nonlocal4"]  # right before the last block of res4
    assert where("c2d_r50_nl1", nonlocal_stage=3) == ["res3.nonlocal2"]
    assert where("c2d_r50_nl1", nonlocal_stage="res5") == ["res5.nonlocal1"]
    assert where("c2d_r50_nl5") == sorted(
        ["res3.nonlocal1", "res3.nonlocal3", "res4.nonlocal1", "res4.nonlocal3", "res4.nonlocal5"]
    )
    assert where("i3d_r101_nl5") == sorted(
        ["res3.nonlocal1", "res3.nonlocal3", "res4.nonlocal6", "res4.nonlocal13", "res4.nonlocal20"]
    )
    assert len(where("c2d_r50_nl10")) == 10 and len(where("c2d_r101_nl10")) == 10
    # The NL block sits right after the residual block it names.
    stage = create_model("c2d_r50_nl5", device="meta").res3
    assert [n for n, _ in stage.named_children()] == ["0", "1", "nonlocal1", "2", "3", "nonlocal3"]
    # Block settings reach every block; temporal_groups per stage (the 128-frame models).
    m = create_model(
        "i3d_r50_nl5", freeze_bn=True, temporal_groups={3: 4}, pairwise="dot_product", device="meta"
    )
    blocks = find_nonlocal_blocks(m)
    assert all(b.norm is None and b.pairwise == "dot_product" for b in blocks.values())
    assert [blocks[k].temporal_groups for k in sorted(blocks)] == [4, 4, None, None, None]


# -- Table 1: feature-map sizes per stage -----------------------------------------------------
# (variant, frames) -> T×H×W after stem conv, res2 (after pool1), pool2, res3, res4, res5.
TABLE1 = {
    # The original code: 2×3×3 pool1 without padding gives 55×55 at res2 (reference §2.1).
    ("original", 32): [
        (16, 112, 112),
        (8, 55, 55),
        (4, 55, 55),
        (4, 28, 28),
        (4, 14, 14),
        (4, 7, 7),
    ],
    ("original", 128): [
        (64, 112, 112),
        (32, 55, 55),
        (16, 55, 55),
        (16, 28, 28),
        (16, 14, 14),
        (16, 7, 7),
    ],
    # Table 1 as printed.
    ("paper", 32): [(16, 112, 112), (8, 56, 56), (4, 56, 56), (4, 28, 28), (4, 14, 14), (4, 7, 7)],
    # The speed models: 8×8 → T = 8 up to res2, 4 from res3; 32×4 → 16 from res3.
    ("speed", 8): [(8, 112, 112), (8, 55, 55), (4, 55, 55), (4, 28, 28), (4, 14, 14), (4, 7, 7)],
    ("speed", 32): [
        (32, 112, 112),
        (32, 55, 55),
        (16, 55, 55),
        (16, 28, 28),
        (16, 14, 14),
        (16, 7, 7),
    ],
}


@pytest.mark.parametrize("temporal", ["c2d", "i3d"])
@pytest.mark.parametrize(("variant", "frames"), sorted(TABLE1))
def test_feature_map_sizes_table1(temporal: str, variant: str, frames: int) -> None:
    model = create_model(f"{temporal}_r50_nl5", variant=variant, device="meta")
    stem_conv: list[tuple[int, ...]] = []
    model.stem.conv.register_forward_hook(lambda m, i, o: stem_conv.append(tuple(o.shape)))
    feats = model.forward_features(torch.empty(1, 3, frames, 224, 224, device="meta"))
    got = [stem_conv[0][2:]] + [
        tuple(feats[k].shape[2:]) for k in ("res2", "pool2", "res3", "res4", "res5")
    ]
    assert got == TABLE1[(variant, frames)]
    widths = [feats[k].shape[1] for k in ("res2", "res3", "res4", "res5")]
    assert widths == [256, 512, 1024, 2048]


# -- inflation: the static-clip property of §4 ------------------------------------------------
@pytest.fixture(scope="module")
def tv_resnet50() -> nn.Module:
    """A torchvision ResNet-50 with random weights and BN statistics (never a download)."""
    torch.manual_seed(0)  # torchvision's own init; every value is then overwritten by randomize
    return randomize(torchvision.models.resnet50(weights=None), seed=1).eval()


def test_inflated_c2d_reproduces_2d_resnet_on_static_clip(tv_resnet50: nn.Module) -> None:
    tv = tv_resnet50
    # c2d with NL blocks: the NL blocks stay at their identity init when loading a 2D checkpoint.
    # variant="paper": its padded 3×3×3 pool1 is torchvision's 3×3 max-pool on a static clip.
    model = create_model("c2d_r50_nl5", num_classes=1000, variant="paper").eval()
    report = load_weights(model, tv.state_dict(), strict=True)
    assert report.source_format == "torchvision"
    assert "stem.conv.weight" in report.inflated and "res4.5.conv_b.weight" in report.inflated
    assert sorted(report.nonlocal_identity) == sorted(find_nonlocal_blocks(model))
    assert "identity init" in str(report)
    frame = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    clip = frame[:, :, None].expand(-1, -1, 4, -1, -1).contiguous()
    with torch.no_grad():
        want = tv(frame)
        got = model(clip)
    assert want.abs().max() > 0.1  # non-trivial logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_inflate_weight_static_input_interior_frames() -> None:
    gen = torch.Generator().manual_seed(0)
    w2 = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=gen)
    w3 = inflate_weight(w2, (5, 4, 3, 3, 3))
    assert w3.shape == (5, 4, 3, 3, 3)
    frame = torch.randn(1, 4, 6, 6, dtype=torch.float64, generator=gen)
    clip = frame[:, :, None].expand(-1, -1, 5, -1, -1)
    out3 = nn.functional.conv3d(clip, w3, padding=(1, 1, 1))
    out2 = nn.functional.conv2d(frame, w2, padding=1)
    for t in range(1, 4):  # frames away from the zero temporal padding
        torch.testing.assert_close(out3[:, :, t], out2)


def test_caffe2_2d_pickle_inflates_like_torchvision(tmp_path, tv_resnet50: nn.Module) -> None:
    """The original release's 2D ImageNet pickle (Caffe2 names, 4-D kernels) → C2D/I3D."""
    sd = tv_resnet50.state_dict()
    bn = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}
    blobs = {"conv1_w": sd["conv1.weight"].numpy()}
    blobs.update({f"res_conv1_bn_{v}": sd[f"bn1.{k}"].numpy() for k, v in bn.items()})
    for s, n in enumerate((3, 4, 6, 3)):
        for i in range(n):
            tvp, c2 = f"layer{s + 1}.{i}", f"res{s + 2}_{i}"
            for j, br in zip("123", "abc"):
                blobs[f"{c2}_branch2{br}_w"] = sd[f"{tvp}.conv{j}.weight"].numpy()
                blobs.update(
                    {
                        f"{c2}_branch2{br}_bn_{v}": sd[f"{tvp}.bn{j}.{k}"].numpy()
                        for k, v in bn.items()
                    }
                )
            if i == 0:
                blobs[f"{c2}_branch1_w"] = sd[f"{tvp}.downsample.0.weight"].numpy()
                blobs.update(
                    {
                        f"{c2}_branch1_bn_{v}": sd[f"{tvp}.downsample.1.{k}"].numpy()
                        for k, v in bn.items()
                    }
                )
    blobs["pred_w"], blobs["pred_b"] = sd["fc.weight"].numpy(), sd["fc.bias"].numpy()
    blobs["model_iter"] = np.array(450450)
    path = tmp_path / "r50_pretrain_c2_model_iter450450_clean.pkl"
    path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))

    a = create_model("i3d_r50", num_classes=1000)
    b = create_model("i3d_r50", num_classes=1000)
    rep_a = load_weights(a, path)
    rep_b = load_weights(b, sd)
    assert rep_a.source_format == "caffe2" and rep_a.ignored == ["model_iter"]
    assert rep_a.complete and rep_b.complete
    assert "res2.0.conv_a.weight" in rep_a.inflated  # 1×1 → 3×1×1, divided by 3
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    w = a.state_dict()["res2.0.conv_a.weight"]
    torch.testing.assert_close(w.sum(2), sd["layer1.0.conv1.weight"][:, :, 0, 0][..., None, None])


# -- loading reports, frozen BN, any input size -----------------------------------------------
def test_load_report_names_missing_unexpected_mismatched() -> None:
    src = create_model("c2d_r50", num_classes=10).state_dict()
    src["extra.weight"] = torch.zeros(3)
    del src["res3.2.bn_b.running_mean"]
    model = create_model("c2d_r50_nl1", num_classes=400)
    report = load_weights(model, src)
    assert report.unexpected == ["extra.weight"]
    assert report.missing == ["res3.2.bn_b.running_mean"]
    assert sorted(m[0] for m in report.mismatched) == ["head.fc.bias", "head.fc.weight"]
    assert report.nonlocal_identity == ["res4.nonlocal4"]
    assert not report.complete
    with pytest.raises(ValueError, match=r"extra\.weight"):
        load_weights(model, src, strict=True)


def small_resnet(**kw: object) -> VideoResNet:
    """A narrow bottleneck I3D with the R50 layout's code paths (stem, pools, shortcuts, NL)."""
    args: dict = {
        "stage_blocks": (2, 2, 2, 1),
        "stage_widths": (4, 8, 16, 32),
        "temporal_kernels": [[3, 3], [3, 1], [3, 1], [1]],
        "stem_channels": 8,
        "stem_kernel": (5, 7, 7),
        "nonlocal_blocks": {3: [1], 4: [0, 1]},
        "num_classes": 7,
    }
    args.update(kw)
    return VideoResNet(**args)


def test_frozen_bn_folding_matches_eval_bn() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 64, 64, generator=gen)
    ref = randomize(small_resnet(), seed=2).eval()
    frozen = small_resnet(freeze_bn=True)
    report = load_weights(frozen, ref.state_dict(), strict=True)
    n_frozen = sum(isinstance(m, FrozenBatchNorm) for m in frozen.modules())
    assert len(report.folded) == n_frozen == 1 + 3 * 7 + 4  # stem, 7 blocks, 4 shortcuts
    # NL blocks keep their BatchNorm (only backbone BN is frozen).
    assert all(isinstance(b.bn, nn.BatchNorm3d) for b in find_nonlocal_blocks(frozen).values())
    frozen.train()  # frozen affines do not depend on the mode (dropout and NL BN aside)
    frozen.head.dropout.p = 0.0
    for b in find_nonlocal_blocks(frozen).values():
        b.eval()
    with torch.no_grad():
        want = ref(x)
        assert want.abs().max() > 0.1
        torch.testing.assert_close(frozen(x), want, rtol=1e-4, atol=1e-5)
        folded = freeze_batch_norm(ref)
        torch.testing.assert_close(folded(x), want, rtol=1e-4, atol=1e-5)
    assert frozen.stem.bn.weight.requires_grad is False
    assert all("bn" not in n for n, _ in frozen.named_parameters() if "nonlocal" not in n)
    # The registry's frozen models: BN → FrozenBatchNorm, and NL blocks without BN by default.
    meta = create_model("i3d_r50_nl5", freeze_bn=True, device="meta")
    assert not any(isinstance(m, nn.BatchNorm3d) for m in meta.modules())


def test_any_input_size_is_fully_convolutional() -> None:
    """Logits for clips of different T/H/W; a batch equals its clips run one at a time."""
    model = randomize(small_resnet(num_classes=5)).eval()
    gen = torch.Generator().manual_seed(4)
    for shape in ((2, 3, 8, 64, 48), (2, 3, 16, 96, 128)):
        x = torch.randn(*shape, generator=gen)
        with torch.no_grad():
            both = model(x)
            one = torch.cat([model(x[:1]), model(x[1:])])
        assert both.shape == (2, 5)
        torch.testing.assert_close(both, one, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(both[0], both[1])
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        model(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="too small for pool1"):
        model(torch.zeros(1, 3, 2, 64, 64))  # T: 2 → 1 after the stem; the 2×3×3 pool1 needs 2
    # The paper's full-frame test clips (256×320) through a registry model, on meta.
    big = create_model("i3d_r50_nl5", device="meta").eval()
    assert big(torch.empty(1, 3, 32, 256, 320, device="meta")).shape == (1, 400)


def test_small_demo_network_from_the_generic_class() -> None:
    """A tiny C2D + 1 NL network on 32×32 clips (the demo's shape), trained one step."""
    model = VideoResNet(
        block="basic",
        stage_blocks=(1, 1, 1),
        stage_widths=(16, 32, 64),
        stem_channels=16,
        stem_kernel=(1, 3, 3),
        stem_stride=(1, 1, 1),
        pool1=None,
        pool2=None,
        nonlocal_blocks={3: [0]},
        nonlocal_kwargs={"subsample": False},
        num_classes=2,
    )
    assert list(find_nonlocal_blocks(model)) == ["res3.nonlocal0"]
    assert 70_000 < sum(p.numel() for p in model.parameters()) < 90_000
    x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1]))
    loss.backward()
    nl = model.res3.nonlocal0
    assert nl.bn.weight.grad is not None and nl.bn.weight.grad.abs().sum() > 0


# -- costs ------------------------------------------------------------------------------------
# [computed] GMACs of the reference (§2.4), 32×224², variant original.
GMACS = {
    "c2d_r50": 20.2,
    "c2d_r50_nl5": 28.4,
    "i3d_r50": 32.8,
    "i3d_r50_nl5": 41.0,
    "c2d_r101": 35.1,
    "c2d_r101_nl5": 43.2,
    "i3d_r101": 51.4,
}


@pytest.mark.parametrize("name", sorted(GMACS))
def test_flops_match_reference_counts(name: str) -> None:
    report = count_cost(create_model(name, device="meta"), (1, 3, 32, 224, 224))
    assert abs(report.flops / 2e9 - GMACS[name]) / GMACS[name] < 0.01
    assert report.params == sum(p.numel() for p in create_model(name, device="meta").parameters())
    if "nl" in name:
        assert report.nl_flops > 0 and report.rows[2].nl_flops > 0  # res3 has NL blocks


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"extent": "space"},
        {"extent": "time"},
        {"temporal_groups": 2},
        {"pairwise": "gaussian"},
        {"pairwise": "dot_product"},
    ],
)
def test_attention_flops_equal_the_explicit_matmuls(kwargs: dict) -> None:
    block = NonLocalBlock(16, backend="explicit", **kwargs)
    x = torch.randn(2, 16, 4, 6, 8)
    with FlopCounterMode(display=False) as counter:
        block(x)
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(v for k, v in counts.items() if "conv" not in str(k))
    assert matmuls == attention_flops(block, x.shape) > 0


def test_flops_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["flops", "i3d_r50_nl5", "--frames", "32", "--size", "224"]) == 0
    out = capsys.readouterr().out
    assert "35.40M parameters" in out and "41.0 GMACs" in out
    assert "res4" in out and "NL share" in out
    assert cli_main(["flops", "i3d_r50", "--frames", "0"]) == 2
