"""``Conv3d``: ``nn.Conv3d`` with a guard against a oneDNN bf16 weight-gradient bug on CPU.

Under CPU bf16 autocast, oneDNN (as shipped with PyTorch 2.14) returns garbage weight gradients
(NaN, or values of 1e30) for a 3-D convolution whose kernel is longer than its input along some
axis: e.g. I3D's 3×1×1 convolutions at T = 2 (``res3``+ of an 8-frame clip) or 5×1×1 at T = 3,
4; a 7×7 kernel on a 2×2 map.  Not every such shape fails, and the failing ones do not always
fail (uninitialised memory); the forward and the input gradient are right.  Such a convolution
is computed in float32 here: it is cheap (the input is tiny along that axis) and exact.  Every
other convolution runs as ``nn.Conv3d`` does.  State-dict keys and parameters are those of
``nn.Conv3d`` (this is a subclass), so weights load unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def kernel_exceeds_input(kernel: tuple[int, ...], x: Tensor) -> bool:
    """Whether the kernel is longer than the (unpadded) input along some spatio-temporal axis."""
    return any(k > s for k, s in zip(kernel, x.shape[-len(kernel) :], strict=True))


class Conv3d(nn.Conv3d):
    """``nn.Conv3d``; in float32 when CPU bf16 autocast meets a kernel longer than its input."""

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and kernel_exceeds_input(self.kernel_size, x)
        ):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)
