"""§6: one non-local block adds "<5% computation" to Mask R-CNN R50 — counted, and printed."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from nlnet.block import NonLocalBlock
from nlnet.detection import flops


def test_attention_flops_formula_matches_an_explicit_count() -> None:
    """The analytic 2·Nq·Nk·(d + dv) equals what FlopCounterMode sees in the explicit backend
    (which materialises θᵀφ with a batched matmul), for the block as used in the backbone."""
    torch.manual_seed(0)
    block = NonLocalBlock(32, dim=2, backend="explicit").eval()
    x = torch.randn(2, 32, 10, 12)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        block(x)
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(v for op, v in counts.items() if op is not torch.ops.aten.convolution)
    assert matmuls == flops.attention_flops(block, x.shape) == 2 * 2 * 120 * 30 * (16 + 16)
    # _count replaces whatever the counter saw inside a block by the analytic figure.
    total, inside = flops._count(block, x)
    assert total == counter.get_total_flops()
    convs = counts[torch.ops.aten.convolution]
    assert inside == convs + matmuls


def test_one_block_adds_less_than_5_percent_to_mask_rcnn_r50(capsys) -> None:
    nl = flops.count_detector_flops("maskrcnn_r50_fpn_nl")
    base = flops.count_detector_flops("maskrcnn_r50_fpn")
    # Only the backbone changes, by exactly the block's FLOPs.
    assert (
        nl.components.keys()
        == base.components.keys()
        == {
            "backbone+fpn",
            "rpn",
            "box_head",
            "mask_head",
        }
    )
    for key in ("rpn", "box_head", "mask_head"):
        assert nl.components[key] == base.components[key]
    assert nl.total - base.total == nl.nonlocal_flops > 0
    # The block at 800×1088: res4 is 50×68, keys 25×34, C = 1024, inner 512.
    nq, nk, c, d = 50 * 68, 25 * 34, 1024, 512
    convs = 2 * (nq * c * d + 2 * nk * c * d + nq * d * c)
    assert nl.nonlocal_flops == convs + 2 * nq * nk * 2 * d
    added = nl.nonlocal_flops / base.total
    assert 0.01 < added < 0.05

    assert flops.print_detector_flops(["maskrcnn_r50_fpn_nl"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("maskrcnn_r50_fpn_nl"))
    assert row.split()[-1] == f"{100 * added:.2f}%"


def test_unknown_detector_name_is_an_error(capsys) -> None:
    assert flops.print_detector_flops(["maskrcnn_r18_fpn"]) == 2
    assert "unknown detector" in capsys.readouterr().out


def test_nlnet_flops_routes_a_detector_name(capsys) -> None:
    from nlnet.cli import main

    assert main(["flops", "maskrcnn_r50_fpn_nl"]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("maskrcnn_"))
    assert row.split()[0] == "maskrcnn_r50_fpn_nl" and row.endswith("%")
