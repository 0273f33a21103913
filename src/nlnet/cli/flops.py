"""The ``nlnet flops`` command: parameters and FLOPs of a video model or a COCO detector.

The counting lives next to the models (:mod:`nlnet.models.flops`, Table 2e, §5.1) and in the
detection package (:mod:`nlnet.detection.flops`, §6); this command layer only routes a name to
one of them, so the video models never import the detection package.
"""

from __future__ import annotations

import argparse
from typing import Any

from nlnet.models import create_model
from nlnet.models.flops import count_cost, paper_cost_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "name", nargs="?", help="model name (nlnet.list_models()), e.g. i3d_r50_nl5"
    )
    parser.add_argument("--frames", type=int, default=32, help="clip length T (default 32)")
    parser.add_argument("--size", type=int, default=224, help="crop size H = W (default 224)")
    parser.add_argument("--num-classes", type=int, default=400)
    parser.add_argument(
        "--variant", default=None, help="temporal layout (original/paper/speed/...)"
    )
    parser.add_argument("--inflate", default=None, help="I3D only: 3x1x1 (default) or 3x3x3")
    parser.add_argument(
        "--paper", action="store_true", help="print Table 2e's relative costs and §5.1's ratios"
    )


def run(args: argparse.Namespace) -> int:
    """Route a video model to :mod:`nlnet.models.flops`, a COCO detector to the detection package."""
    if args.name and args.name.startswith(("maskrcnn_", "keypointrcnn_")):
        # COCO detectors (§6) are counted by the detection package at their own input size.
        from nlnet.detection.flops import print_detector_flops

        return int(print_detector_flops([args.name]) or 0)

    if args.frames < 1 or args.size < 1:
        print(
            f"nlnet flops: error: --frames and --size must be positive, got {args.frames}, {args.size}"
        )
        return 2
    if args.paper:
        print(paper_cost_table(args.frames, args.size))
        if args.name is None:
            return 0
    if args.name is None:
        print("nlnet flops: error: give a model name (or --paper)")
        return 2
    kw: dict[str, Any] = {"num_classes": args.num_classes, "device": "meta"}
    if args.variant is not None:
        kw["variant"] = args.variant
    if args.inflate is not None:
        kw["inflate"] = args.inflate
    try:
        model = create_model(args.name, **kw)
        report = count_cost(model, (1, 3, args.frames, args.size, args.size))
    except (ValueError, TypeError, RuntimeError) as err:
        print(f"nlnet flops: error: {err}")
        return 2
    print(
        f"{args.name}: {report.params / 1e6:.2f}M parameters, {report.flops / 1e9:.1f} GFLOPs "
        f"({report.flops / 2e9:.1f} GMACs)"
    )
    print(report.table())
    return 0
