"""Tiny video ResNets for the CPU demo (``nlnet demo``): C2D, C2D + one non-local block, I3D.

They are the paper's §4 designs scaled down to 32×32 clips of the synthetic "colour match" task
(:mod:`nlnet.data.synthetic`): a stem and three residual stages of basic blocks, widths
16/32/64, then global average pooling and a linear classifier (Table 1's head).

* ``demo_c2d``: every convolution is 1×3×3 — frames are processed independently until the
  average pool (the paper's C2D baseline, §4).
* ``demo_c2d_nl``: the same network plus one embedded-Gaussian non-local block (§3.3, inner
  width C/2, BN γ = 0 so it starts as the identity) after stage 2, where features are
  T×16×16 — the paper's "one block in the middle of the network" (Table 2a, 2b).
* ``demo_i3d``: the first convolution of every block inflated to 3×3×3 (temporal kernel 3, §4's
  I3D), no non-local block.

Parameter counts (2 classes): 77.5k (C2D), 79.7k (C2D + NL), 128k (I3D).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from nlnet.block import NonLocalBlock
from nlnet.models.registry import register_model


class BasicBlock3d(nn.Module):
    """Residual basic block (two convolutions), spatial stride on the first one.

    ``temporal_kernel`` is the temporal size of the first convolution (1 = C2D, 3 = I3D).
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int = 1, temporal_kernel: int = 1
    ) -> None:
        super().__init__()
        kt = temporal_kernel
        self.conv1 = nn.Conv3d(
            in_channels,
            out_channels,
            (kt, 3, 3),
            stride=(1, stride, stride),
            padding=(kt // 2, 1, 1),
            bias=False,
        )
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.bn2 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=(1, stride, stride), bias=False),
                nn.BatchNorm3d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class TinyVideoResNet(nn.Module):
    """Stem + stages of basic blocks + (optional) non-local blocks + average pool + fc.

    Args:
        num_classes: classifier outputs.
        widths: channels of each stage; stage i > 0 halves the spatial size.
        blocks: basic blocks per stage.
        temporal_kernels: temporal kernel of each stage's first convolutions (1 or 3).
        nonlocal_stages: 1-based stages followed by one non-local block.
        nonlocal_kwargs: keyword arguments of :class:`~nlnet.block.NonLocalBlock`.
        in_channels: input channels (3 for RGB).
        stem_stride: spatial stride of the stem convolution (2: stage 1 works at half size).
        stem_pool: add a 1×3×3 max-pool (stride 2) after the stem, like Table 1's pool1.
        dropout: dropout before the classifier (the paper uses 0.5 on Kinetics).
    """

    def __init__(
        self,
        num_classes: int = 2,
        *,
        widths: Sequence[int] = (16, 32, 64),
        blocks: Sequence[int] = (1, 1, 1),
        temporal_kernels: Sequence[int] = (1, 1, 1),
        nonlocal_stages: Sequence[int] = (),
        nonlocal_kwargs: dict[str, Any] | None = None,
        in_channels: int = 3,
        stem_stride: int = 2,
        stem_pool: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not (len(widths) == len(blocks) == len(temporal_kernels)):
            raise ValueError(
                f"widths, blocks and temporal_kernels must have one entry per stage, got "
                f"{len(widths)}, {len(blocks)}, {len(temporal_kernels)}"
            )
        for s in nonlocal_stages:
            if not 1 <= s <= len(widths):
                raise ValueError(f"nonlocal_stages entries must be in 1..{len(widths)}, got {s}")
        stem: list[nn.Module] = [
            nn.Conv3d(
                in_channels,
                widths[0],
                (1, 3, 3),
                stride=(1, stem_stride, stem_stride),
                padding=(0, 1, 1),
                bias=False,
            ),
            nn.BatchNorm3d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        if stem_pool:  # Table 1's pool1, spatial only
            stem.append(nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)))
        self.stem = nn.Sequential(*stem)
        nl_kwargs = dict(nonlocal_kwargs or {})
        stages = []
        prev = widths[0]
        for i, (width, n, kt) in enumerate(zip(widths, blocks, temporal_kernels)):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers[f"block{j}"] = BasicBlock3d(prev, width, stride=stride, temporal_kernel=kt)
                prev = width
            if i + 1 in nonlocal_stages:
                layers["nonlocal"] = NonLocalBlock(width, dim=3, **nl_kwargs)
            stages.append(nn.Sequential(layers))
        self.stages = nn.ModuleList(stages)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(prev, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He init for convolutions, N(0, 0.01) for fc; non-local blocks keep their own init."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, NonLocalBlock):
                m.reset_parameters()  # identity at start (§3.3), undoing the loop above
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.fc(self.dropout(torch.flatten(x.mean(dim=(2, 3, 4)), 1)))


def _build(num_classes: int, pretrained: Any, **kwargs: Any) -> TinyVideoResNet:
    if pretrained is not None:
        raise ValueError("the demo models have no released weights; pass pretrained=None")
    return TinyVideoResNet(num_classes, **kwargs)


@register_model("demo_c2d")
def demo_c2d(num_classes: int = 2, pretrained: Any = None, **kwargs: Any) -> TinyVideoResNet:
    """Tiny C2D: 1×3×3 convolutions only, widths 16/32/64."""
    return _build(num_classes, pretrained, **kwargs)


@register_model("demo_c2d_nl")
def demo_c2d_nl(
    num_classes: int = 2,
    pretrained: Any = None,
    *,
    pairwise: str = "embedded_gaussian",
    nonlocal_stages: Sequence[int] = (2,),
    nonlocal_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> TinyVideoResNet:
    """Tiny C2D + one non-local block after stage 2 (``stages.1.nonlocal``)."""
    nl = {"pairwise": pairwise, **(nonlocal_kwargs or {})}
    return _build(
        num_classes, pretrained, nonlocal_stages=nonlocal_stages, nonlocal_kwargs=nl, **kwargs
    )


@register_model("demo_i3d")
def demo_i3d(num_classes: int = 2, pretrained: Any = None, **kwargs: Any) -> TinyVideoResNet:
    """Tiny I3D: the first convolution of every block is 3×3×3."""
    kwargs.setdefault("temporal_kernels", (3, 3, 3))
    return _build(num_classes, pretrained, **kwargs)
