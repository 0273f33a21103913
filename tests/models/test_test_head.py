"""The original release's fully-convolutional test head (reference §4.2, §5.4; issue 10 item 5).

Checked in float64 against a plain loop: average res5 over every [T, 7, 7] window (stride 1),
apply the fc at each window, softmax each, average the probabilities.
"""

from __future__ import annotations

import pytest
import torch

from nlnet import create_model
from nlnet.models import TEST_HEADS, Head, VideoResNet


def loop_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) → (B, K) averaged probabilities, one window position at a time."""
    b, _, _, h, w = x.shape
    kh, kw = min(7, h), min(7, w)
    out = []
    for n in range(b):
        probs = []
        for i in range(h - kh + 1):
            for j in range(w - kw + 1):
                v = x[n, :, :, i : i + kh, j : j + kw].mean(dim=(1, 2, 3))
                probs.append(torch.softmax(weight @ v + bias, dim=0))
        out.append(torch.stack(probs).mean(0))
    return torch.stack(out)


def make_head(channels: int = 6, classes: int = 5, **kw) -> Head:
    head = Head(channels, classes, 0.0, {"dtype": torch.float64}, **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        head.fc.weight.copy_(torch.randn(head.fc.weight.shape, generator=g, dtype=torch.float64))
        head.fc.bias.copy_(torch.randn(head.fc.bias.shape, generator=g, dtype=torch.float64))
    return head


@pytest.mark.parametrize("size", [(8, 8), (9, 11), (7, 10)])
def test_fully_conv_matches_loop_reference_values_and_gradients(size: tuple[int, int]) -> None:
    head = make_head(test_head="fully_conv").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, *size, generator=g, dtype=torch.float64, requires_grad=True)
    out = head(x)
    assert head.returns_log_probabilities
    ref = loop_reference(x, head.fc.weight, head.fc.bias)
    torch.testing.assert_close(out.exp(), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.fully_conv(x), ref, rtol=1e-12, atol=1e-12)
    # more than one position, so the result differs from the global head
    glob = torch.softmax(head.fc(x.mean(dim=(2, 3, 4))), dim=1)
    assert (ref - glob).abs().max() > 1e-6
    # gradients (w.r.t. the features and the fc) equal the loop's
    up = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    gx, gw = torch.autograd.grad((out.exp() * up).sum(), (x, head.fc.weight))
    rx, rw = torch.autograd.grad((ref * up).sum(), (x, head.fc.weight))
    torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size", [(7, 7), (2, 2), (1, 3)])
def test_one_position_equals_softmax_of_global_head(size: tuple[int, int]) -> None:
    head = make_head(test_head="fully_conv").eval()
    x = torch.randn(3, 6, 2, *size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    full = head(x)
    head.test_head = "global"
    glob = head(x)
    torch.testing.assert_close(full.exp(), torch.softmax(glob, dim=1), rtol=1e-12, atol=1e-12)
    # softmax of the log-probabilities gives the probabilities back (what callers do)
    torch.testing.assert_close(torch.softmax(full, 1), full.exp(), rtol=1e-12, atol=1e-12)


def test_train_mode_is_the_global_head() -> None:
    head = make_head(test_head="fully_conv").train()
    x = torch.randn(2, 6, 2, 9, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert not head.returns_log_probabilities
    torch.testing.assert_close(head(x), head.fc(x.mean(dim=(2, 3, 4))), rtol=0, atol=0)


def test_option_is_threaded_through_create_model_and_validated() -> None:
    model = create_model("c2d_r50", num_classes=7, test_head="fully_conv", device="meta")
    assert isinstance(model, VideoResNet)
    assert model.test_head == "fully_conv" == model.head.test_head
    assert create_model("i3d_r50_nl5", device="meta").test_head == "global"
    model.test_head = "global"
    assert model.head.test_head == "global"
    with pytest.raises(ValueError, match=r"'fully-conv'.*global"):
        create_model("c2d_r50", test_head="fully-conv", device="meta")
    with pytest.raises(ValueError, match="unknown test_head"):
        model.test_head = "pooled"
    assert TEST_HEADS == ("global", "fully_conv")
    # no new parameters or buffers: weight files are unchanged
    a = create_model("c2d_r50", device="meta").state_dict()
    b = create_model("c2d_r50", test_head="fully_conv", device="meta").state_dict()
    assert list(a) == list(b)


def test_video_resnet_end_to_end_float64() -> None:
    torch.manual_seed(0)
    model = VideoResNet(
        stage_blocks=(1, 1),
        stage_widths=(4, 8),
        stem_channels=4,
        pool1=None,
        pool2=None,
        stem_stride=(1, 2, 2),
        num_classes=6,
        test_head="fully_conv",
        dtype=torch.float64,
    )
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.5, 0.5)
    torch.nn.init.normal_(model.head.fc.weight, std=0.5)
    model.eval()
    x = torch.randn(2, 3, 2, 36, 34, dtype=torch.float64)  # res3: 9×9 → 3×3 positions
    with torch.no_grad():
        res = model.forward_features(x)[model.stage_names[-1]]
        assert res.shape[-2:] == (9, 9)
        ref = loop_reference(res, model.head.fc.weight, model.head.fc.bias)
        torch.testing.assert_close(model(x).exp(), ref, rtol=1e-12, atol=1e-12)
