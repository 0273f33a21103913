"""The paper's video models (§4, §5.1, Table 1–2) as registered builders.

``create_model("i3d_r50_nl5", num_classes=400, variant="original", ...)``.  Every builder takes
the same keyword arguments (see :func:`build_video_resnet`); unknown ones raise ``TypeError``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from nlnet.models.registry import register_model
from nlnet.models.resnet import PoolSpec, VideoResNet, stage_name
from nlnet.models.weights import load_weights

log = logging.getLogger(__name__)

DEPTHS: dict[int, tuple[int, ...]] = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
WIDTHS: tuple[int, ...] = (64, 128, 256, 512)

# Temporal variants (reference §2.1, §2.3; the peers' for their converted weights):
# conv1 temporal stride, pool1 and pool2 as ((kT,kH,kW), stride, padding).
TEMPORAL_VARIANTS: dict[str, dict[str, Any]] = {
    # The original code's resnet_video_org.py (32×2 and 128×1 clips): 2×3×3 / 2×1×1 pools, no pad.
    "original": {
        "stem_t_stride": 2,
        "pool1": ((2, 3, 3), (2, 2, 2), (0, 0, 0)),
        "pool2": ((2, 1, 1), (2, 1, 1), (0, 0, 0)),
    },
    # Table 1 as printed: 3×3×3 / 3×1×1 pools (padded so 32×224² gives 16×112², 8×56², 4×56²…).
    "paper": {
        "stem_t_stride": 2,
        "pool1": ((3, 3, 3), (2, 2, 2), (1, 1, 1)),
        "pool2": ((3, 1, 1), (2, 1, 1), (1, 0, 0)),
    },
    # The original code's resnet_video.py (its 8×8 and 32×4 models).
    "speed": {
        "stem_t_stride": 1,
        "pool1": ((1, 3, 3), (1, 2, 2), (0, 0, 0)),
        "pool2": ((2, 1, 1), (2, 1, 1), (0, 0, 0)),
    },
    # PySlowFast's C2D/I3D 8×8: the speed variant with a spatially padded pool1.
    "slowfast": {
        "stem_t_stride": 1,
        "pool1": ((1, 3, 3), (1, 2, 2), (0, 1, 1)),
        "pool2": ((2, 1, 1), (2, 1, 1), (0, 0, 0)),
    },
    # PySlowFast's c2d_nopool / i3d_nopool archs (C2D_NOPOOL_8x8_R50): no pool after res2.
    "slowfast_nopool": {
        "stem_t_stride": 1,
        "pool1": ((1, 3, 3), (1, 2, 2), (0, 1, 1)),
        "pool2": None,
    },
    # mmaction2's ResNet3d I3D: 1×3×3 pool1 with temporal stride 2, padded spatially.
    "mmaction2": {
        "stem_t_stride": 2,
        "pool1": ((1, 3, 3), (2, 2, 2), (0, 1, 1)),
        "pool2": ((2, 1, 1), (2, 1, 1), (0, 0, 0)),
    },
}
VARIANTS: tuple[str, ...] = tuple(TEMPORAL_VARIANTS)


def i3d_temporal_kernels(stage_blocks: Sequence[int], kernel: int = 3) -> list[list[int]]:
    """The original code's I3D pattern (reference §2.2): one inflated kernel in every other block.

    res2: all blocks; middle stages: blocks 0, 2, 4, …; last stage: blocks 1, 3, ….
    For ResNet-50 that is [3,3,3], [3,1,3,1], [3,1,3,1,3,1], [1,3,1].
    """
    out = []
    last = len(stage_blocks) - 1
    for s, n in enumerate(stage_blocks):
        if s == 0:
            out.append([kernel] * n)
        elif s == last:
            out.append([kernel if i % 2 == 1 else 1 for i in range(n)])
        else:
            out.append([kernel if i % 2 == 0 else 1 for i in range(n)])
    return out


def nonlocal_placement(
    depth: int, count: int, nonlocal_stage: int | str | None = None
) -> dict[str, list[int]]:
    """Where the paper puts 0, 1, 5 or 10 NL blocks (§5.1, Table 2b–c; reference §5.3).

    * 1: right before the last residual block of res4 (or of ``nonlocal_stage``: Table 2b).
    * 5: every other block of res3 and res4 at the original code's positions: after res3 blocks
      1, 3 and res4 blocks 1, 3, 5 (R50) or 6, 13, 20 (R101).
    * 10: after every block of res3 and res4 (R50).  For R101 the paper gives no positions; we
      use all 4 of res3 and res4 blocks 3, 7, 11, 15, 19, 22 (evenly spaced, ending at the last).
    """
    blocks = DEPTHS[depth]
    if nonlocal_stage is not None and count != 1:
        raise ValueError(
            f"nonlocal_stage applies to one-block models (Table 2b), got {count} NL blocks"
        )
    if count == 0:
        return {}
    if count == 1:
        name = stage_name(4 if nonlocal_stage is None else nonlocal_stage)
        idx = int(name[3:]) - 2
        if not 0 <= idx < len(blocks):
            raise ValueError(f"nonlocal_stage must be one of res2..res5, got {nonlocal_stage!r}")
        return {name: [blocks[idx] - 2]}
    if count == 5:
        return {"res3": [1, 3], "res4": [1, 3, 5] if depth == 50 else [6, 13, 20]}
    if count == 10:
        res4 = list(range(6)) if depth == 50 else [3, 7, 11, 15, 19, 22]
        return {"res3": [0, 1, 2, 3], "res4": res4}
    raise ValueError(
        f"nonlocal_blocks must be 0, 1, 5, 10 or a {{stage: [indices]}} mapping, got {count!r}"
    )


def build_video_resnet(
    *,
    depth: int,
    temporal: str,
    nonlocal_blocks: int | Mapping[int | str, Sequence[int]] = 0,
    num_classes: int = 400,
    variant: str = "original",
    inflate: str | None = None,
    pairwise: str = "embedded_gaussian",
    extent: str = "spacetime",
    temporal_groups: int | Mapping[int | str, int] | None = None,
    norm: str | None = "batch",
    scale: float | None = None,
    pool_before_conv: bool = True,
    subsample: bool | Sequence[int] = True,
    backend: str = "auto",
    freeze_bn: bool = False,
    dropout: float = 0.5,
    nonlocal_stage: int | str | None = None,
    zero_init_residual: bool = False,
    test_head: str = "global",
    pretrained: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> VideoResNet:
    """Build a C2D or I3D ResNet-50/101 with non-local blocks (§4, Table 1, Table 2).

    Args:
        depth: 50 or 101.
        temporal: ``"c2d"`` (all kernels 1×k×k, conv1 1×7×7) or ``"i3d"`` (conv1 5×7×7, one
            kernel inflated in every other block; §2.2 of the reference).
        nonlocal_blocks: 0, 1, 5, 10 (see :func:`nonlocal_placement`) or ``{stage: [indices]}``.
        variant: temporal variant, one of :data:`VARIANTS` (``original``: the code's 2×3×3 /
            2×1×1 pools; ``paper``: Table 1's 3×3×3 / 3×1×1; ``speed``: the 8×8 models;
            ``slowfast`` / ``slowfast_nopool``: PySlowFast's c2d, i3d / c2d_nopool, i3d_nopool
            archs; ``mmaction2``). Recorded with the other non-shape settings in
            ``model.settings``, which loading checks (:mod:`nlnet.models.settings`).
        inflate: ``"3x1x1"`` (default for I3D) or ``"3x3x3"`` (Table 2e); I3D only.
        pairwise, extent, norm, scale, pool_before_conv, subsample, backend: passed to every
            :class:`~nlnet.block.NonLocalBlock` (Table 2a, 2d).  ``norm`` defaults to ``None``
            when ``freeze_bn`` (the original 128-frame models' NL blocks have no BN).
        temporal_groups: attention within groups of this many frames: an int for every NL
            block, or ``{stage: int}`` (the original 128×1 NL models use ``{3: 4}``).
        freeze_bn: every backbone BN becomes a frozen affine (the 128-frame recipe, §4.1).
        dropout: before the classifier (0.5).
        nonlocal_stage: stage of the single block of a one-block model (Table 2b).
        test_head: eval-mode head: ``"global"`` (global mean → fc) or ``"fully_conv"`` (the
            original release's test net, §4.2: softmax at every [T, 7, 7] window position,
            averaged; the output is then log-probabilities). See :class:`~nlnet.models.Head`.
        pretrained: a checkpoint path, URL or state dict loaded with
            :func:`nlnet.models.load_weights` (our format, torchvision 2D ResNets and the
            foreign layouts of :mod:`nlnet.models.convert` are recognised and inflated).
    """
    if depth not in DEPTHS:
        raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth!r}")
    if variant not in TEMPORAL_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    blocks = DEPTHS[depth]
    if temporal == "c2d":
        if inflate is not None:
            raise ValueError(
                f"inflate={inflate!r} is for I3D models; a C2D model has no 3D kernels"
            )
        kernels = [[1] * n for n in blocks]
        stem_t = 1
        inflate = "3x1x1"
    elif temporal == "i3d":
        inflate = "3x1x1" if inflate is None else inflate
        kernels = i3d_temporal_kernels(blocks)
        stem_t = 5
    else:
        raise ValueError(f"temporal must be 'c2d' or 'i3d', got {temporal!r}")

    if isinstance(nonlocal_blocks, Mapping):
        if nonlocal_stage is not None:
            raise ValueError(
                "nonlocal_stage cannot be combined with an explicit nonlocal_blocks mapping"
            )
        placement: Mapping[int | str, Sequence[int]] = nonlocal_blocks
    else:
        placement = nonlocal_placement(depth, nonlocal_blocks, nonlocal_stage)

    nl_kwargs: dict[str, Any] = {
        "pairwise": pairwise,
        "extent": extent,
        "norm": norm,
        "scale": scale,
        "pool_before_conv": pool_before_conv,
        "subsample": subsample,
        "backend": backend,
    }
    stage_kwargs: dict[str, dict[str, Any]] = {}
    if isinstance(temporal_groups, Mapping):
        stage_kwargs = {stage_name(k): {"temporal_groups": v} for k, v in temporal_groups.items()}
    elif temporal_groups is not None:
        nl_kwargs["temporal_groups"] = temporal_groups

    pools = TEMPORAL_VARIANTS[variant]
    pool1: PoolSpec = pools["pool1"]
    pool2: PoolSpec | None = pools["pool2"]
    model = VideoResNet(
        stage_blocks=blocks,
        stage_widths=WIDTHS,
        temporal_kernels=kernels,
        inflate=inflate,
        stem_channels=64,
        stem_kernel=(stem_t, 7, 7),
        stem_stride=(pools["stem_t_stride"], 2, 2),
        pool1=pool1,
        pool2=pool2,
        nonlocal_blocks=placement,
        nonlocal_kwargs=nl_kwargs,
        nonlocal_stage_kwargs=stage_kwargs,
        num_classes=num_classes,
        dropout=dropout,
        freeze_bn=freeze_bn,
        zero_init_residual=zero_init_residual,
        test_head=test_head,
        device=device,
        dtype=dtype,
    )
    # The settings that change the computation without changing a shape (checked on load).
    model.settings = {  # type: ignore[assignment]
        "variant": variant,
        "inflate": inflate if temporal == "i3d" else None,
        "pairwise": pairwise,
        "extent": extent,
        "temporal_groups": temporal_groups,
        "norm": norm,
        "scale": scale,
        "pool_before_conv": pool_before_conv,
        "subsample": subsample,
        "freeze_bn": freeze_bn,
        "nonlocal_blocks": nonlocal_blocks,
        "nonlocal_stage": nonlocal_stage,
        "dropout": dropout,
        "backend": backend,
        "zero_init_residual": zero_init_residual,
    }
    if pretrained is not None:
        report = load_weights(model, pretrained)
        log.info("loaded pretrained weights: %s", report)
        model.load_report = report  # type: ignore[assignment]
    return model


# The keywords every registered builder accepts: build_video_resnet's, less what the name fixes.
_BUILDER_KWARGS: tuple[str, ...] = tuple(
    n
    for n in inspect.signature(build_video_resnet).parameters
    if n not in ("depth", "temporal") and n != "num_classes"
)


def _build(
    name: str, depth: int, temporal: str, count: int, num_classes: int, kwargs: dict[str, Any]
) -> VideoResNet:
    unknown = sorted(set(kwargs) - set(_BUILDER_KWARGS))
    if unknown:
        raise TypeError(
            f"{name}() got unknown keyword argument(s) {unknown}; "
            f"accepted: num_classes, {', '.join(_BUILDER_KWARGS)}"
        )
    if kwargs.get("freeze_bn") and "norm" not in kwargs:
        kwargs["norm"] = None  # the original affine models' NL blocks have no BN
    kwargs.setdefault("nonlocal_blocks", count)
    return build_video_resnet(depth=depth, temporal=temporal, num_classes=num_classes, **kwargs)


# -- the registered models (§4, Table 2): C2D / I3D, ResNet-50 / 101, 0 / 1 / 5 / 10 NL blocks --
# Every builder takes the keyword arguments of build_video_resnet (variant, inflate, pairwise,
# extent, temporal_groups, norm, scale, pool_before_conv, subsample, backend, freeze_bn, dropout,
# nonlocal_stage, nonlocal_blocks, zero_init_residual, pretrained, device, dtype).


@register_model("c2d_r50")
def c2d_r50(num_classes: int = 400, **kwargs: Any) -> VideoResNet:
    """C2D ResNet-50 baseline (Table 1)."""
    return _build("c2d_r50", 50, "c2d", 0, num_classes, kwargs)


@register_model("c2d_r50_nl1")
def c2d_r50_nl1(num_classes: int = 400, **kwargs: Any) -> VideoResNet:
    """C2D ResNet-50 with 1 non-local block (res4, before its last block; Table 2a-b)."""
    return _build("c2d_r50_nl1", 50, "c2d", 1, num_classes, kwargs)


@register_model("c2d_r50_nl5")
def c2d_r50_nl5(num_classes: int = 400, **kwargs: Any) -> VideoResNet:
    """C2D ResNet-50 with 5 non-local blocks (res3: 2, res4: 3; Table 2c)."""
    return _build("c2d_r50_nl5", 50, "c2d", 5, num_classes, kwargs)


@register_model("c2d_r50_nl10")
def c2d_r50_nl10(num_classes: int = 400, **kwargs: Any) -> VideoResNet:
    """C2D ResNet-50 with 10 non-local blocks (every res3/res4 block; Table 2c)."""
    return _build("c2d_r50_nl10", 50, "c2d", 10, num_classes, kwargs)


@register_model("i3d_r50")
def i3d_r50(num_classes: int = 400, **kwargs: Any) -> VideoResNet:
    """I3D ResNet-50 baseline (§4, inflated 3x1x1 kernels in every other block)."""
    return _build("i3d_r50", 50, "i3d", 0, num_classes, kwargs)


@register_model("i3d_r50_nl1")
def i3d_r50_nl1(num_classes: int = 400, **kwargs: Any) -> VideoResNet:
    """I3D ResNet-50 with 1 non-local block."""
    return _build("i3d_r50_nl1", 50, "i3d", 1, num_classes, kwargs)


@register_model("i3d_r50_nl5")
def i3d_r50_nl5(num_classes: int = 400, **kwargs: Any) -> VideoResNet:
    """I3D ResNet-50 with 5 non-local blocks: the paper's NL I3D (Table 2d, 3)."""
    return _build("i3d_r50_nl5", 50, "i3d", 5, num_classes, kwargs)


@register_model("i3d_r50_nl10")
def i3d_r50_nl10(num_classes: int = 400, **kwargs: Any) -> VideoResNet:
    """I3D ResNet-50 with 10 non-local blocks."""
    return _build("i3d_r50_nl10", 50, "i3d", 10, num_classes, kwargs)


@register_model("c2d_r101")
def c2d_r101(num_classes: int = 400, **kwargs: Any) -> VideoResNet:
    """C2D ResNet-101 baseline (Table 2c, 2e)."""
    return _build("c2d_r101", 101, "c2d", 0, num_classes, kwargs)


@register_model("c2d_r101_nl1")
def c2d_r101_nl1(num_classes: int = 400, **kwargs: Any) -> VideoResNet:
    """C2D ResNet-101 with 1 non-local block."""
    return _build("c2d_r101_nl1", 101, "c2d", 1, num_classes, kwargs)


@register_model("c2d_r101_nl5")
def c2d_r101_nl5(num_classes: int = 400, **kwargs: Any) -> VideoResNet:
    """C2D ResNet-101 with 5 non-local blocks (res3 1, 3; res4 6, 13, 20)."""
    return _build("c2d_r101_nl5", 101, "c2d", 5, num_classes, kwargs)


@register_model("c2d_r101_nl10")
def c2d_r101_nl10(num_classes: int = 400, **kwargs: Any) -> VideoResNet:
    """C2D ResNet-101 with 10 non-local blocks."""
    return _build("c2d_r101_nl10", 101, "c2d", 10, num_classes, kwargs)


@register_model("i3d_r101")
def i3d_r101(num_classes: int = 400, **kwargs: Any) -> VideoResNet:
    """I3D ResNet-101 baseline (Table 3)."""
    return _build("i3d_r101", 101, "i3d", 0, num_classes, kwargs)


@register_model("i3d_r101_nl1")
def i3d_r101_nl1(num_classes: int = 400, **kwargs: Any) -> VideoResNet:
    """I3D ResNet-101 with 1 non-local block."""
    return _build("i3d_r101_nl1", 101, "i3d", 1, num_classes, kwargs)


@register_model("i3d_r101_nl5")
def i3d_r101_nl5(num_classes: int = 400, **kwargs: Any) -> VideoResNet:
    """I3D ResNet-101 with 5 non-local blocks (Table 3's NL I3D R101)."""
    return _build("i3d_r101_nl5", 101, "i3d", 5, num_classes, kwargs)


@register_model("i3d_r101_nl10")
def i3d_r101_nl10(num_classes: int = 400, **kwargs: Any) -> VideoResNet:
    """I3D ResNet-101 with 10 non-local blocks."""
    return _build("i3d_r101_nl10", 101, "i3d", 10, num_classes, kwargs)
