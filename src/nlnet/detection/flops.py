"""FLOPs of the detectors (§6: one non-local block adds "<5% computation" to Mask R-CNN).

Counted with ``torch.utils.flop_counter.FlopCounterMode`` on the **meta** device (no memory, no
real arithmetic), one component at a time at the standard test configuration:

* backbone + FPN on one padded input (default 800×1088: a 480×640 COCO image resized to a
  shorter side of 800, padded to a multiple of 32);
* RPN head on every FPN level;
* box head on ``rpn_post_nms_top_n_test`` proposals (1000); mask / keypoint head on
  ``box_detections_per_img`` detections (100) — the most the test configuration runs.

RoIAlign, NMS and the element-wise ops are not counted (FLOPs = 2 × multiply-adds of
convolutions and matrix products, FlopCounterMode's convention).  The non-local blocks' attention
matmuls (θᵀφ and the weighted sum of g) are counted analytically — 2·Nq·Nk·(d + d_v) per image —
because the counter sees no FLOPs in some fused attention kernels (SDPA on CPU); anything the
counter did attribute to a block besides its convolutions is replaced by that figure.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nlnet.block import NonLocalBlock
from nlnet.models.flops import attention_flops  # one formula for video and detection blocks


@dataclass
class DetectorFlops:
    """FLOPs per component of one detector at one input size."""

    name: str
    input_size: tuple[int, int]
    components: dict[str, int] = field(default_factory=dict)
    nonlocal_flops: int = 0  # all FLOPs of the non-local blocks (convs + attention)

    @property
    def total(self) -> int:
        return sum(self.components.values())


def _count(module: nn.Module, *inputs: object) -> tuple[int, int]:
    """(total FLOPs, FLOPs inside non-local blocks) of ``module(*inputs)``."""
    blocks = {name: m for name, m in module.named_modules() if isinstance(m, NonLocalBlock)}
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args, name=name: shapes.__setitem__(name, tuple(args[0].shape))
        )
        for name, m in blocks.items()
    ]
    try:
        with FlopCounterMode(display=False) as counter:
            module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    counts = counter.get_flop_counts()
    total = counter.get_total_flops()
    nonlocal_total = 0
    conv = torch.ops.aten.convolution
    root = type(module).__name__
    for name, block in blocks.items():
        if name not in shapes:
            continue
        per_op = counts.get(f"{root}.{name}" if name else root, {})
        convs = sum(v for op, v in per_op.items() if op is conv)
        others = sum(v for op, v in per_op.items() if op is not conv)
        analytic = attention_flops(block, shapes[name])
        total += analytic - others
        nonlocal_total += convs + analytic
    return total, nonlocal_total


def count_detector_flops(
    model: nn.Module | str,
    input_size: tuple[int, int] = (800, 1088),
    *,
    num_proposals: int | None = None,
    num_detections: int | None = None,
    **create_kwargs: object,
) -> DetectorFlops:
    """FLOPs of a detector (an instance or a registered name) per component, on the meta device.

    Args:
        model: a detector from :func:`nlnet.detection.create_detector`, or its name.
        input_size: (H, W) of the padded network input (after the detector's resize).
        num_proposals: RoIs through the box head (default the model's test-time RPN output).
        num_detections: RoIs through the mask/keypoint head (default ``box_detections_per_img``).
    """
    from nlnet.detection.registry import create_detector

    name = model if isinstance(model, str) else type(model).__name__
    with torch.device("meta"):
        if isinstance(model, str):
            net = create_detector(model, **create_kwargs)  # type: ignore[arg-type]
        else:
            net = copy.deepcopy(model).to("meta")
    net.eval()
    heads = net.roi_heads
    if num_proposals is None:
        num_proposals = int(net.rpn._post_nms_top_n["testing"])
    if num_detections is None:
        num_detections = int(heads.detections_per_img)
    h, w = input_size
    result = DetectorFlops(name=name, input_size=(h, w))
    with torch.no_grad():
        x = torch.empty(1, 3, h, w, device="meta")
        backbone_flops, nl = _count(net.backbone, x)
        result.components["backbone+fpn"] = backbone_flops
        result.nonlocal_flops += nl
        features = net.backbone(x)
        levels = list(features.values())
        result.components["rpn"], _ = _count(net.rpn.head, levels)
        channels = net.backbone.out_channels
        box_in = torch.empty(num_proposals, channels, 7, 7, device="meta")
        box_flops, _ = _count(heads.box_head, box_in)
        box_feat = heads.box_head(box_in)
        pred_flops, _ = _count(heads.box_predictor, box_feat)
        result.components["box_head"] = box_flops + pred_flops
        for kind in ("mask", "keypoint"):
            head = getattr(heads, f"{kind}_head", None)
            if head is None:
                continue
            roi_in = torch.empty(num_detections, channels, 14, 14, device="meta")
            head_flops, nl = _count(head, roi_in)
            pred_flops, _ = _count(getattr(heads, f"{kind}_predictor"), head(roi_in))
            result.components[f"{kind}_head"] = head_flops + pred_flops
            result.nonlocal_flops += nl
    return result


def flops_table(
    names: Sequence[str], input_size: tuple[int, int] = (800, 1088)
) -> list[tuple[str, float, float, float]]:
    """(name, GFLOPs, non-local GFLOPs, % added over the same model without blocks) per name."""
    rows = []
    for name in names:
        res = count_detector_flops(name, input_size)
        base = res.total - res.nonlocal_flops
        added = 100.0 * res.nonlocal_flops / base if base else 0.0
        rows.append((name, res.total / 1e9, res.nonlocal_flops / 1e9, added))
    return rows


def print_detector_flops(names: Sequence[str], input_size: tuple[int, int] = (800, 1088)) -> int:
    """Print the FLOPs table for detector ``names``; the exit status for a command (2: bad name).

    ``nlnet flops maskrcnn_r50_fpn_nl`` lands here (:mod:`nlnet.cli.flops`).
    """
    from nlnet.detection.registry import list_detectors

    unknown = [n for n in names if n not in list_detectors()]
    if unknown:
        print(
            f"nlnet flops: error: unknown detector(s) {unknown}; known: {', '.join(list_detectors())}"
        )
        return 2
    h, w = input_size
    print(f"FLOPs at a {h}×{w} input (1000 proposals, 100 detections; 2 FLOPs per multiply-add)")
    print(f"{'model':42s} {'GFLOPs':>9s} {'non-local':>10s} {'added':>7s}")
    for name, total, nl, added in flops_table(names, (h, w)):
        print(f"{name:42s} {total:9.1f} {nl:10.2f} {added:6.2f}%")
    return 0
