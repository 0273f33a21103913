"""Small video ResNets for the CPU demo (``nlnet demo``): C2D, C2D + one non-local block, I3D.

Each builder is the library's :class:`~nlnet.models.resnet.VideoResNet` (the same class as the
paper's R50/R101 models) scaled down to the 32×32 clips of the synthetic "colour match" task
(:mod:`nlnet.data.synthetic`): a 1×5×5 stem with spatial stride 4 (no pool1: a 5×5 square lands
in one or two 8×8 cells), three stages of one basic block each, widths 16/32/64 (``res2``..
``res4`` at 8×8, 4×4, 2×2; no pool2), then Table 1's head (global average pool, linear
classifier).

* ``demo_c2d``: every convolution is 1×k×k — frames are processed independently until the
  average pool (the paper's C2D baseline, §4).
* ``demo_c2d_nl``: the same network plus one non-local block after ``res3`` (``res3.nonlocal0``,
  queries T×4×4, keys sub-sampled 2×2 in space, §3.3), the paper's "one block in the middle of
  the network" (Table 2a, 2b); embedded-Gaussian pairwise function (Eq. 3), initialised to take
  part in learning at once (:data:`DEMO_NONLOCAL`).
* ``demo_i3d``: the first convolution of every block inflated to 3×3×3 (temporal kernel 3, §4's
  I3D), no non-local block.

Parameter counts (2 classes): 78.3k (C2D), 80.4k (C2D + NL), 129k (I3D).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nlnet.models.registry import register_model
from nlnet.models.resnet import VideoResNet

#: The demo networks' shape (:class:`VideoResNet` keywords); a builder's keywords override them.
DEMO_LAYOUT: dict[str, Any] = {
    "stage_blocks": (1, 1, 1),
    "stage_widths": (16, 32, 64),
    "block": "basic",
    "stem_channels": 16,
    "stem_kernel": (1, 5, 5),
    "stem_stride": (1, 4, 4),
    "pool1": None,
    "pool2": None,
    "dropout": 0.0,
}


#: The demo block's initialisation (a from-scratch network, unlike the paper's fine-tuning):
#: BN γ = 1 instead of 0 and θ/φ/g/W_z weights N(0, 0.2²) instead of N(0, 0.01²), so the block
#: takes part in learning from the first step (with the paper's identity init the demo's runs
#: sat on a partial solution — matching one colour channel, 77 % — for hundreds of iterations).
DEMO_NONLOCAL: dict[str, Any] = {"zero_init": False, "init_std": 0.2}


def _demo_resnet(num_classes: int, pretrained: Any, **kwargs: Any) -> VideoResNet:
    if pretrained is not None:
        raise ValueError("the demo models have no released weights; pass pretrained=None")
    return VideoResNet(num_classes=num_classes, **{**DEMO_LAYOUT, **kwargs})


@register_model("demo_c2d")
def demo_c2d(num_classes: int = 2, pretrained: Any = None, **kwargs: Any) -> VideoResNet:
    """Small C2D (§4): 1×3×3 convolutions only, basic blocks, widths 16/32/64."""
    return _demo_resnet(num_classes, pretrained, **kwargs)


@register_model("demo_c2d_nl")
def demo_c2d_nl(
    num_classes: int = 2,
    pretrained: Any = None,
    *,
    pairwise: str = "embedded_gaussian",
    nonlocal_blocks: Mapping[int | str, Sequence[int]] | None = None,
    nonlocal_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> VideoResNet:
    """Small C2D + one non-local block (Eq. 1, §3.3) after ``res3``'s block (``res3.nonlocal0``).

    ``pairwise`` picks f (Eqs. 2–5); ``nonlocal_blocks`` moves or adds blocks
    (``{stage: [block indices]}``); ``nonlocal_kwargs`` go to every
    :class:`~nlnet.block.NonLocalBlock` (``inner_channels``, ``zero_init``, …).
    """
    placement = {3: [0]} if nonlocal_blocks is None else nonlocal_blocks
    nl = {"pairwise": pairwise, **DEMO_NONLOCAL, **dict(nonlocal_kwargs or {})}
    return _demo_resnet(
        num_classes, pretrained, nonlocal_blocks=placement, nonlocal_kwargs=nl, **kwargs
    )


@register_model("demo_i3d")
def demo_i3d(num_classes: int = 2, pretrained: Any = None, **kwargs: Any) -> VideoResNet:
    """Small I3D (§4): the first convolution of every block is 3×3×3."""
    kwargs.setdefault("temporal_kernels", ((3,), (3,), (3,)))
    return _demo_resnet(num_classes, pretrained, **kwargs)
