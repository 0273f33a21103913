"""``Conv3d``/``Conv2d``: convolutions guarded against oneDNN bf16 weight-gradient bugs on CPU.

Under CPU bf16 autocast, oneDNN (as shipped with PyTorch 2.14) returns garbage weight gradients
(NaN, or values of 1e30) for a 3-D convolution whose kernel is longer than its input along some
axis: e.g. I3D's 3×1×1 convolutions at T = 2 (``res3``+ of an 8-frame clip) or 5×1×1 at T = 3,
4; a 7×7 kernel on a 2×2 map.  Not every such shape fails, and the failing ones do not always
fail (uninitialised memory); the forward and the input gradient are right.  2-D convolutions
have the same bug (a 3×3 stride-2 convolution of 256 channels on a 1×1 map, 7×7 on 2×2).  Such a
convolution is computed in float32 here: it is cheap (the input is tiny along that axis) and
exact.  A second oneDNN bug, seen on an AMX CPU: the bf16 weight gradient of a *strided* 1×1×1
convolution (the ResNet shortcut projection, e.g. ``res5.0``'s at T = 1 or 2 with channels-last
weights) never returns (an endless loop in ``brgemm_convolution_bwd_weights``).  A strided
1×1(×1) convolution without padding equals the stride-1 convolution of the input sub-sampled by
that stride, which is what runs here under CPU autocast: same values, a different oneDNN kernel.
Every other convolution runs as ``nn.Conv3d``/``nn.Conv2d`` does.  These are
subclasses with the same parameters and state-dict keys, so weights load unchanged;
:class:`~nlnet.models.resnet.VideoResNet` is built from :class:`Conv3d`, and
:func:`guard_convolutions` converts the plain convolutions of any other model (the trainer does
so before training in bf16 on a CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlnet.ops.layout import memory_format


def kernel_exceeds_input(kernel: tuple[int, ...], x: Tensor) -> bool:
    """Whether the kernel is longer than the (unpadded) input along some spatio-temporal axis."""
    return any(k > s for k, s in zip(kernel, x.shape[-len(kernel) :], strict=True))


def strided_pointwise(kernel: tuple[int, ...], stride: tuple[int, ...], padding: object) -> bool:
    """A 1×1(×1) kernel with a stride above 1 and no padding: a sub-sampling then a product."""
    unpadded = padding == "valid" or (
        not isinstance(padding, str) and all(p == 0 for p in padding)  # type: ignore[attr-defined]
    )
    return all(k == 1 for k in kernel) and any(s > 1 for s in stride) and unpadded


class _Subsample(torch.autograd.Function):
    """``x[..., ::s₁, ::s₂(, ::s₃)]`` whose gradient has x's memory format.

    A slice's own gradient is a contiguous zero tensor: in a channels-last network it would meet
    channels-last gradients downstream and send them through slow layout conversions (pool2's
    backward took 5× longer).
    """

    @staticmethod
    def forward(ctx, x: Tensor, stride: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        ctx.index = (..., *(slice(None, None, s) for s in stride))
        ctx.like = (x.shape, x.dtype, x.device, memory_format(x))
        return x[ctx.index]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        shape, dtype, device, fmt = ctx.like
        gx = torch.empty(shape, dtype=dtype, device=device, memory_format=fmt).zero_()
        gx[ctx.index] = grad
        return gx, None


def subsample(x: Tensor, stride: tuple[int, ...]) -> Tensor:
    """Every ``stride``-th element along the last ``len(stride)`` axes (gradient in x's format)."""
    return _Subsample.apply(x, stride)


class _Guarded:
    """``forward`` of the guarded convolutions: around oneDNN's CPU bf16 bugs, exactly."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    weight: Tensor
    bias: Tensor | None
    groups: int

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16
            if bf16 and kernel_exceeds_input(self.kernel_size, x):
                with torch.autocast("cpu", enabled=False):
                    return super().forward(x.float())  # type: ignore[misc]
            if strided_pointwise(self.kernel_size, self.stride, self.padding):
                return self._pointwise(subsample(x, tuple(self.stride)))
        return super().forward(x)  # type: ignore[misc]

    def _pointwise(self, x: Tensor) -> Tensor:
        """This convolution with stride 1 and no padding (its weight and bias unchanged)."""
        conv = F.conv3d if len(self.kernel_size) == 3 else F.conv2d
        return conv(x, self.weight, self.bias, 1, 0, 1, self.groups)


class Conv3d(_Guarded, nn.Conv3d):
    """``nn.Conv3d``; under CPU bf16 autocast, float32 where the kernel is longer than its input
    and sub-sampling + stride 1 where a 1×1×1 kernel is strided (see the module docstring)."""


class Conv2d(_Guarded, nn.Conv2d):
    """``nn.Conv2d``; under CPU bf16 autocast, float32 where the kernel is longer than its input
    and sub-sampling + stride 1 where a 1×1 kernel is strided (see the module docstring)."""


_GUARDED: dict[type, type] = {nn.Conv3d: Conv3d, nn.Conv2d: Conv2d}


def guard_convolutions(model: nn.Module) -> int:
    """Turn every plain ``nn.Conv2d``/``nn.Conv3d`` of ``model`` into its guarded subclass, in
    place (parameters, hooks and state dict unchanged); return how many were converted.

    Subclasses of the plain layers (e.g. torchvision's or already guarded ones) are left as
    they are: only modules whose type is exactly ``nn.Conv2d``/``nn.Conv3d`` change class.
    """
    converted = 0
    for module in model.modules():
        guarded = _GUARDED.get(type(module))
        if guarded is not None:
            module.__class__ = guarded
            converted += 1
    return converted
