"""``nlnet.models.conv.Conv3d``: right weight gradients under CPU bf16 autocast for kernels longer
than their input (where oneDNN's bf16 path returns garbage), bf16 everywhere else."""

from __future__ import annotations

import pytest
import torch

from nlnet.engine.runtime import to_channels_last
from nlnet.models.conv import Conv2d, Conv3d, kernel_exceeds_input, strided_pointwise


def _grads(conv: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, bf16: bool):
    conv.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = conv(x)
    (y.float() * dy).sum().backward()
    return y, conv.weight.grad.double(), x.grad.double()


@pytest.mark.parametrize(
    ("shape", "kernel", "padding"),
    [
        ((1, 64, 2, 7, 7), (3, 1, 1), (1, 0, 0)),  # I3D res3 at 8 frames: T = 2 < 3
        ((1, 64, 3, 7, 7), (5, 1, 1), (2, 0, 0)),
        ((1, 16, 4, 2, 2), (1, 7, 7), (0, 3, 3)),  # a 7×7 kernel on a 2×2 map
    ],
)
def test_kernel_longer_than_input_gives_float64_gradients(shape, kernel, padding) -> None:
    gen = torch.Generator().manual_seed(0)
    conv = Conv3d(shape[1], 32, kernel, padding=padding, bias=False)
    x = torch.randn(*shape, generator=gen)
    assert kernel_exceeds_input(conv.kernel_size, x)
    dy = torch.randn(1, 32, *shape[2:], generator=gen)
    y, dw, dx = _grads(conv, x, dy, bf16=True)
    ref = torch.nn.Conv3d(shape[1], 32, kernel, padding=padding, bias=False).double()
    ref.load_state_dict(conv.state_dict())
    _, rw, rx = _grads(ref, x.double(), dy.double(), bf16=False)
    assert y.dtype == torch.float32  # computed in float32
    torch.testing.assert_close(dw, rw, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx, rx, rtol=1e-4, atol=1e-5)


def test_other_shapes_stay_in_bf16_and_match_nn_conv3d() -> None:
    gen = torch.Generator().manual_seed(1)
    conv = Conv3d(8, 16, (3, 3, 3), padding=1, bias=False)
    plain = torch.nn.Conv3d(8, 16, (3, 3, 3), padding=1, bias=False)
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 8, 4, 6, 6, generator=gen)
    dy = torch.randn(2, 16, 4, 6, 6, generator=gen)
    ours, theirs = _grads(conv, x, dy, bf16=True), _grads(plain, x, dy, bf16=True)
    assert ours[0].dtype == torch.bfloat16
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    assert list(conv.state_dict()) == ["weight"] and isinstance(conv, torch.nn.Conv3d)


def test_guard_convolutions_converts_plain_layers_in_place() -> None:
    """A plain 2-D network (as torchvision's detectors are built) gets the same guard: a 3×3
    stride-2 convolution of 256 channels on a 1×1 map, where oneDNN's bf16 weight gradient
    fails, gives the float64 gradient after ``guard_convolutions``."""
    from nlnet.models.conv import Conv2d, guard_convolutions

    gen = torch.Generator().manual_seed(2)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(256, 32, 3, stride=2, padding=1, bias=True),
        torch.nn.ReLU(),
        torch.nn.Conv3d(4, 4, 1),  # unused here: converted too
        Conv3d(4, 4, 1),  # already guarded: left as it is
    )
    keys = list(net.state_dict())
    reference = torch.nn.Conv2d(256, 32, 3, stride=2, padding=1).double()
    reference.load_state_dict(net[0].state_dict())
    assert guard_convolutions(net) == 2
    assert type(net[0]) is Conv2d and type(net[2]) is Conv3d and type(net[3]) is Conv3d
    assert list(net.state_dict()) == keys
    assert guard_convolutions(net) == 0  # idempotent
    x = torch.randn(2, 256, 1, 1, generator=gen)
    dy = torch.randn(2, 32, 1, 1, generator=gen)
    _, dw, dx = _grads(net[0], x, dy, bf16=True)
    _, rw, rx = _grads(reference, x.double(), dy.double(), bf16=False)
    torch.testing.assert_close(dw, rw, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx, rx, rtol=1e-4, atol=1e-5)


def _graph_ops(y: torch.Tensor) -> set[str]:
    """The names of the autograd nodes ``y`` was computed through."""
    nodes, stack = {}, [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and id(node) not in nodes:
            nodes[id(node)] = node.name()
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    return set(nodes.values())


@pytest.mark.parametrize(
    ("cls", "shape", "stride", "channels_last"),
    [
        (Conv3d, (1, 64, 1, 14, 14), (1, 2, 2), True),  # res5.0's shortcut at 8 frames (T = 1)
        (Conv3d, (2, 32, 4, 9, 9), (2, 2, 2), False),  # odd sizes: the last row/column counts
        (Conv2d, (2, 32, 9, 9), (2, 2), False),  # torchvision's downsample projection
    ],
)
def test_strided_pointwise_convolution_subsamples_then_multiplies(
    cls, shape, stride, channels_last
) -> None:
    """Under CPU bf16 autocast a strided 1×1(×1) convolution runs as sub-sampling + a stride-1
    convolution (oneDNN's strided bf16 weight gradient can hang): values and both gradients
    follow float64 to bf16 rounding, with a bias too."""
    gen = torch.Generator().manual_seed(2)
    conv = cls(shape[1], 48, 1, stride=stride, bias=True)
    with torch.no_grad():
        conv.bias.normal_(generator=gen)
    assert strided_pointwise(conv.kernel_size, conv.stride, conv.padding)
    x = torch.randn(*shape, generator=gen)
    if channels_last:
        to_channels_last(conv)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    plain = (torch.nn.Conv3d if cls is Conv3d else torch.nn.Conv2d)(
        shape[1], 48, 1, stride=stride, bias=True
    ).double()
    plain.load_state_dict(conv.state_dict())
    out = [(s + st - 1) // st for s, st in zip(shape[2:], stride, strict=True)]
    dy = torch.randn(shape[0], 48, *out, generator=gen)
    y, dw, dx = _grads(conv, x, dy, bf16=True)
    with torch.no_grad():  # the reference sees the bf16-rounded operands autocast gives oneDNN
        plain.weight.copy_(plain.weight.bfloat16().double())
    ry, rw, rx = _grads(plain, x.bfloat16().double(), dy.bfloat16().double(), bf16=False)
    assert y.dtype == torch.bfloat16 and y.shape == ry.shape
    assert "_SubsampleBackward" in _graph_ops(y)  # the rewrite ran (the stock layer has none)
    for ours, ref in ((y.double(), ry), (dw, rw), (dx, rx)):
        assert ((ours - ref).norm() / ref.norm()).item() < 1e-2  # bf16 output rounding: ~3e-3
    assert rx.abs().sum() > 0 and (rx == 0).any()  # only the strided positions get a gradient
    assert torch.equal(dx != 0, rx != 0)
    assert conv.bias.grad is not None and conv.bias.grad.dtype == torch.float32


@pytest.mark.parametrize(
    ("shape", "fmt"),
    [
        ((2, 8, 3, 5, 6), torch.channels_last_3d),
        ((2, 8, 3, 5, 6), torch.contiguous_format),
        ((2, 8, 5, 6), torch.channels_last),
    ],
)
def test_subsample_gradient_keeps_the_input_memory_format(shape, fmt) -> None:
    """The sub-sampling's gradient is x[..., ::s, ::s]'s (zero off the grid) and has x's memory
    format: a channels-last network gets channels-last gradients (a plain slice gives contiguous
    ones, and downstream layout conversions were 5× slower)."""
    from nlnet.models.conv import subsample

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt)
    x.requires_grad_()
    stride = (1, 2, 2)[-len(shape) + 2 :] if len(shape) == 5 else (2, 3)
    index = (..., *(slice(None, None, s) for s in stride))
    y = subsample(x, stride)
    assert torch.equal(y, x[index])
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (dx,) = torch.autograd.grad(y, x, dy)
    (ref,) = torch.autograd.grad(x[index], x, dy)
    assert torch.equal(dx, ref) and (dx != 0).sum() == dy.numel()
    assert dx.is_contiguous(memory_format=fmt)
    assert torch.autograd.gradcheck(lambda t: subsample(t, stride), (x[:1, :2],))


def test_padded_or_unstrided_pointwise_convolutions_are_not_rewritten() -> None:
    assert not strided_pointwise((1, 1, 1), (1, 1, 1), (0, 0, 0))
    assert not strided_pointwise((1, 1, 1), (1, 2, 2), (0, 1, 1))  # padding: not a sub-sampling
    assert not strided_pointwise((1, 3, 3), (1, 2, 2), (0, 0, 0))
    assert not strided_pointwise((1, 1), (2, 2), "same")
    assert strided_pointwise((1, 1), (2, 2), "valid")
