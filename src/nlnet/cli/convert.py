"""``nlnet convert``: other projects' checkpoints to self-describing nlnet weight files
(:mod:`nlnet.models.convert`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nlnet.models.convert import convert_checkpoint
from nlnet.models.io import (
    UnsafeCheckpointError,
    read_checkpoint,
    unwrap_state_dict,
)
from nlnet.models.layouts import (
    FORMATS,
    detect_format,
)


# -- the ``nlnet convert`` command ------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from",
        dest="fmt",
        choices=(*FORMATS, "auto"),
        default="auto",
        help="source layout (default: auto, from the keys)",
    )
    parser.add_argument("src", help="source checkpoint (path or URL)")
    parser.add_argument("dst", help="output file (self-describing nlnet weights, torch.save)")
    parser.add_argument(
        "--arch", default=None, help="nlnet model name, e.g. i3d_r50_nl5 (default: inferred)"
    )
    parser.add_argument(
        "--variant",
        default=None,
        help="caffe2 (required) / slowfast (required unless the file's cfg names MODEL.ARCH): "
        "temporal layout, one of original, speed, slowfast, slowfast_nopool",
    )
    parser.add_argument(
        "--pairwise",
        default=None,
        help="mmaction2 NL models (required unless gaussian): the config's NL mode "
        "(embedded_gaussian or dot_product)",
    )
    parser.add_argument(
        "--use-scale",
        action="store_true",
        help="mmaction2 only: the config sets use_scale=True (scale dim_inner^-1/2)",
    )
    parser.add_argument(
        "--classes",
        default=None,
        help="class names stored in the file: 'kinetics400' or a text file with one per line",
    )


def _options(fmt: str, args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if fmt in ("caffe2", "slowfast"):
        options["variant"] = args.variant
    elif fmt == "mmaction2":
        options["pairwise"] = args.pairwise
        options["scale"] = None if args.use_scale else 1.0
    given = {"--variant": args.variant, "--pairwise": args.pairwise}
    for flag, value in given.items():
        used = flag == "--variant" and fmt in ("caffe2", "slowfast")
        used = used or (flag == "--pairwise" and fmt == "mmaction2")
        if value is not None and not used:
            raise ValueError(f"{flag} does not apply to {fmt} weights")
    return options


def run(args: argparse.Namespace) -> int:
    try:
        fmt = args.fmt
        if fmt == "auto":
            fmt = detect_format(unwrap_state_dict(read_checkpoint(args.src)))
        classes = None
        if args.classes == "kinetics400":
            from nlnet.data.classes import kinetics400

            classes = kinetics400()
        elif args.classes is not None:
            classes = [
                ln.strip() for ln in Path(args.classes).read_text().splitlines() if ln.strip()
            ]
        conv, report, _ = convert_checkpoint(
            fmt, args.src, args.dst, args.arch, classes=classes, **_options(fmt, args)
        )
    except (ValueError, TypeError, FileNotFoundError, UnsafeCheckpointError) as err:
        print(f"nlnet convert: error: {err}")
        return 1
    print(f"wrote {args.dst}: {conv.arch}, {conv.num_classes} classes, {report}")
    print(
        f"load it with: nlnet.create_model(weights={str(args.dst)!r})  # builds {conv.arch}("
        + ", ".join(f"{k}={v!r}" for k, v in conv.model_kwargs.items())
        + ")"
    )
    for note in conv.notes:
        print(f"note: {note}")
    return 0
