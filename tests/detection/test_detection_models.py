"""§6 detectors: identity at init, baseline checkpoints, padding invariance, head placement, weights."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads

from nlnet.detection import (
    NonLocalKeypointHead,
    create_detector,
    list_detectors,
    load_backbone_weights,
    load_detector_weights,
    padding_mask,
)

# Small images and few RoIs keep R50 detectors fast on CPU.
SMALL = {
    "min_size": 64,
    "max_size": 96,
    "rpn_pre_nms_top_n_test": 200,
    "rpn_post_nms_top_n_test": 50,
    "box_detections_per_img": 8,
}


def _images(gen: torch.Generator, sizes: list[tuple[int, int]], dtype=torch.float32):
    return [torch.rand(3, h, w, generator=gen, dtype=dtype) for h, w in sizes]


def test_registry_names_and_errors() -> None:
    names = set(list_detectors())
    for n in (
        "maskrcnn_r50_fpn",
        "maskrcnn_r50_fpn_nl",
        "maskrcnn_r101_fpn",
        "maskrcnn_r101_fpn_nl",
        "keypointrcnn_r101_fpn",
        "keypointrcnn_r101_fpn_nl_head",
        "keypointrcnn_r101_fpn_nl_head_backbone",
        "keypointrcnn_r50_fpn_nl_head",
    ):
        assert n in names
    assert list_detectors("maskrcnn_*_nl") == ["maskrcnn_r101_fpn_nl", "maskrcnn_r50_fpn_nl"]
    with pytest.raises(ValueError, match="unknown detector 'maskrcnn_r18'"):
        create_detector("maskrcnn_r18")
    with pytest.raises(ValueError, match="num_classes"):
        create_detector("maskrcnn_r50_fpn", num_classes=1)


def test_architecture_block_positions() -> None:
    with torch.device("meta"):  # structure only: no weights are initialised
        m = create_detector("keypointrcnn_r101_fpn_nl_head_backbone", **SMALL)
        base = create_detector("keypointrcnn_r101_fpn", **SMALL)
        r50 = create_detector("keypointrcnn_r50_fpn")
        tv = torchvision.models.detection.keypointrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=2
        )
    # R101's res4 has 23 blocks; the NL block sits before the last one and sees 1024 channels.
    assert len(m.backbone.body.layer3) == 23
    assert m.backbone.nonlocal_res4.in_channels == 1024
    assert m.backbone.nonlocal_res4.pairwise == "embedded_gaussian"
    assert m.backbone.nonlocal_res4.subsample == (2, 2)
    assert len(m.roi_heads.keypoint_head.nonlocal_blocks) == 4
    assert m.roi_heads.box_predictor.cls_score.out_features == 2  # person + background
    assert base.backbone.nonlocal_res4 is None

    # Same names as torchvision's models apart from the blocks (checkpoints are interchangeable).
    def names(m: nn.Module) -> set[str]:
        return {k for k in m.state_dict() if not k.endswith("num_batches_tracked")}

    assert names(r50) == names(tv)


def test_padding_mask_extents() -> None:
    mask = padding_mask([(128, 64), (100, 128)], (128, 128), (8, 8))
    assert mask is not None and mask.shape == (2, 8, 8) and mask.dtype == torch.bool
    want0 = torch.ones(8, 8, dtype=torch.bool)
    want0[:, :4] = False
    want1 = torch.ones(8, 8, dtype=torch.bool)
    want1[: math.ceil(100 / 16), :] = False
    assert torch.equal(mask[0], want0) and torch.equal(mask[1], want1)
    assert padding_mask([(128, 128)], (128, 128), (8, 8)) is None
    with pytest.raises(ValueError, match="does not fit"):
        padding_mask([(130, 64)], (128, 128), (8, 8))


def test_nl_model_equals_baseline_at_init_and_loads_baseline_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    base = create_detector("maskrcnn_r50_fpn", 4, **SMALL).eval()
    path = tmp_path / "baseline.pth"
    torch.save(base.state_dict(), path)
    nl = create_detector("maskrcnn_r50_fpn_nl", 4, weights=path, **SMALL).eval()
    images = _images(torch.Generator().manual_seed(1), [(64, 64), (48, 64)])
    with torch.no_grad():
        want = base(images)
        got = nl(images)
    assert len(want[0]["boxes"]) > 0 and len(want[1]["boxes"]) > 0
    for a, b in zip(want, got):
        for key in ("boxes", "labels", "scores", "masks"):
            assert torch.equal(a[key], b[key]), key

    # The block is really in the computation: once it is not the identity, features change.
    with torch.no_grad():
        x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
        before = nl.backbone(x)["0"].clone()
        nl.backbone.nonlocal_res4.bn.weight.fill_(1.0)
        after = nl.backbone(x)["0"]
    assert not torch.allclose(before, after)

    # Only the non-local parameters may be missing; anything else is an error.
    state = base.state_dict()
    missing = load_detector_weights(nl, state)
    assert missing and all("nonlocal_res4" in k for k in missing)
    state["roi_heads.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        load_detector_weights(nl, state)
    del state["roi_heads.extra.weight"]
    del state["rpn.head.conv.0.0.weight"]
    with pytest.raises(ValueError, match=r"rpn\.head\.conv\.0\.0\.weight"):
        load_detector_weights(nl, state)


def test_block_ignores_padding_inside_backbone() -> None:
    """Over each image's region, the block's output on the padded batch equals its output on
    that image's feature map alone (float64, eval)."""
    torch.manual_seed(0)
    model = create_detector("maskrcnn_r50_fpn_nl", 4, min_size=64, max_size=128)
    model = model.double().eval()
    block = model.backbone.nonlocal_res4
    with torch.no_grad():  # a non-trivial block: the identity at init would prove nothing
        block.bn.weight.normal_()
        block.bn.bias.normal_()
        block.bn.running_mean.normal_()
        block.bn.running_var.uniform_(0.5, 2.0)
    seen = {}

    def hook(module, args, kwargs, out):
        seen.update(x=args[0], mask=kwargs["key_padding_mask"], out=out)
        raise _Stop  # the rest of the backbone is not needed

    handle = block.register_forward_hook(hook, with_kwargs=True)
    images = _images(
        torch.Generator().manual_seed(3), [(64, 64), (100, 50), (50, 100)], torch.float64
    )
    with torch.no_grad(), pytest.raises(_Stop):
        image_list, _ = model.transform(images)
        model.backbone(image_list.tensors, image_sizes=image_list.image_sizes)
    handle.remove()
    big_h, big_w = image_list.tensors.shape[-2:]
    x, out, mask = seen["x"], seen["out"], seen["mask"]
    assert mask is not None and mask.shape == (3, *x.shape[-2:])
    for i, (h, w) in enumerate(image_list.image_sizes):
        vh = math.ceil(h * x.shape[-2] / big_h)
        vw = math.ceil(w * x.shape[-1] / big_w)
        assert torch.equal(~mask[i], _box_mask(x.shape[-2:], vh, vw))
        with torch.no_grad():
            alone = block(x[i : i + 1, :, :vh, :vw])
            unmasked = block(x[i : i + 1])
        torch.testing.assert_close(out[i : i + 1, :, :vh, :vw], alone, rtol=0, atol=1e-10)
        if (vh, vw) != tuple(x.shape[-2:]):  # padding present: attending to it would differ
            assert (unmasked[..., :vh, :vw] - alone).abs().max() > 1e-6


class _Stop(Exception):
    pass


def _box_mask(shape, vh: int, vw: int) -> torch.Tensor:
    m = torch.zeros(*shape, dtype=torch.bool)
    m[:vh, :vw] = True
    return m


def test_keypoint_head_places_a_block_after_every_two_convs() -> None:
    torch.manual_seed(0)
    head = NonLocalKeypointHead(16, (16,) * 8).double().eval()
    assert len(head.nonlocal_blocks) == 4
    x = torch.randn(3, 16, 14, 14, dtype=torch.float64)
    # At init the blocks are the identity: torchvision's head with the same convs agrees.
    plain = KeypointRCNNHeads(16, [16] * 8).double().eval()
    result = plain.load_state_dict(head.state_dict(), strict=False)
    assert all(k.startswith("nonlocal_blocks.") for k in result.unexpected_keys)
    assert not result.missing_keys
    with torch.no_grad():
        torch.testing.assert_close(head(x), plain(x), rtol=0, atol=0)
        for blk in head.nonlocal_blocks:
            blk.bn.weight.normal_()
        convs = [m for m in head.children() if isinstance(m, nn.Conv2d)]
        y = x
        for i, conv in enumerate(convs):
            y = torch.relu(conv(y))
            if i % 2 == 1:
                y = head.nonlocal_blocks[i // 2](y)
        torch.testing.assert_close(head(x), y, rtol=0, atol=1e-12)
        assert (head(x) - plain(x)).abs().max() > 1e-6
    with pytest.raises(ValueError, match="divisor"):
        NonLocalKeypointHead(16, (16,) * 8, every=3)


def test_imagenet_backbone_from_path_and_url(tmp_path) -> None:
    torch.manual_seed(0)
    state = torchvision.models.resnet50().state_dict()
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(state, path)
    m = create_detector("maskrcnn_r50_fpn_nl", 4, pretrained_backbone=path)
    body = m.backbone.body
    for source in (path, path.as_uri()):  # a file, then a URL (through torch.hub's cache)
        if source != path:
            with torch.no_grad():
                for t in body.state_dict().values():
                    t.zero_()
            load_backbone_weights(m, source, model_dir=str(tmp_path / "hub"))
        assert torch.equal(body.layer3[5].conv2.weight, state["layer3.5.conv2.weight"])
        assert torch.equal(body.bn1.running_var, state["bn1.running_var"])
        assert torch.equal(body.conv1.weight, state["conv1.weight"])
    assert (tmp_path / "hub" / path.name).is_file()
    with torch.device("meta"):  # the check happens before any tensor is copied
        r101 = create_detector("maskrcnn_r101_fpn", 4)
    with pytest.raises(ValueError, match="ResNet-101"):
        load_backbone_weights(r101, path)
    with pytest.raises(FileNotFoundError):
        load_backbone_weights(r101, tmp_path / "missing.pth")
