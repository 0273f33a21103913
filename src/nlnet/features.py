"""``nlnet extract-features VIDEO... --weights W --out DIR``: per-video features (§4.2 views).

    nlnet extract-features videos/ --weights i3d_r50_nl5.orig_32x2_k400 --out feats/
    nlnet extract-features a.mp4 --weights w.pth --out feats/ --format pt --block res4.nonlocal5

Each video is read with the same test protocol as ``nlnet predict`` (:mod:`nlnet.predict`:
10 clips × 3 crops by default).  For every view the classifier's input — res5, 2048 channels
for a ResNet-50 — is averaged over T×H×W (the global pool of Table 1), and those vectors are
averaged over the views: one ``(2048,)`` vector per video.  ``--block NAME`` (repeatable, any
``model.named_modules()`` name such as ``res4.nonlocal5``) also captures that module's output
with a forward hook: pooled the same way (``(C,)``), or with ``--block-pool none`` every view's
full map ``(views, C, T, H, W)``.

Files (written atomically, folder inputs keep their sub-folders):

* ``--format npy``: ``DIR/<name>.npy`` (features) and ``DIR/<name>.<block>.npy``;
* ``--format pt``: ``DIR/<name>.pt``, a dict ``{"features", "blocks": {name: tensor}, "video",
  "views", "arch"}`` (load it with ``torch.load(..., weights_only=True)``).

``DIR/index.json`` lists every video with its files or its error.  Exit code 0 when at least
one video was processed, 1 when none was, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nlnet.io import atomic_save, atomic_write, atomic_write_text
from nlnet.predict import (
    PER_VIDEO_ERRORS,
    VideoInput,
    _message,
    add_common_arguments,
    infer_video,
    module_by_name,
    prepare,
    progress,
    summary,
)

PROG = "nlnet extract-features"
FORMATS = ("npy", "pt")


def _save_npy(array: np.ndarray, path: Path) -> None:
    with atomic_write(path, "wb") as fh:
        np.save(fh, array)


def write_features(
    video: VideoInput,
    out_dir: Path,
    fmt: str,
    features: torch.Tensor,
    blocks: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> list[str]:
    """Write one video's features (float32) in ``fmt``; returns the files written."""
    feats = features.float()
    if fmt == "pt":
        path = out_dir / f"{video.name}.pt"
        atomic_save(
            {
                "features": feats,
                "blocks": {k: v.float() for k, v in blocks.items()},
                "video": video.path,
                **meta,
            },
            path,
        )
        return [str(path)]
    paths = [out_dir / f"{video.name}.npy"]
    _save_npy(feats.numpy(), paths[0])
    for name, value in blocks.items():
        paths.append(out_dir / f"{video.name}.{name}.npy")
        _save_npy(value.float().numpy(), paths[-1])
    return [str(p) for p in paths]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--out", required=True, help="folder for the feature files")
    parser.add_argument("--format", choices=FORMATS, default="npy", help="file format (npy)")
    parser.add_argument(
        "--block", action="append", default=[], metavar="NAME",
        help="also save this module's output, e.g. res4.nonlocal5 (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--block-pool", choices=("avg", "none"), default="avg",
        help="avg: pool blocks over T×H×W and views (C,); none: every view's map",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    ready = prepare(args, PROG)
    if isinstance(ready, int):
        return ready
    inputs, loaded = ready
    try:
        for name in args.block:
            module_by_name(loaded.model, name)
    except ValueError as e:
        print(f"{PROG}: --block: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    results: list[dict[str, Any]] = []
    meta = {"arch": loaded.cfg.get("arch"), "protocol": loaded.describe()["protocol"]}
    for video in progress(inputs, "extract-features"):
        if video.error:
            results.append({"video": video.path, "error": video.error})
            continue
        try:
            out = infer_video(
                loaded.model, video.path, loaded.protocol, batch_size=args.batch_size,
                device=loaded.device, features=True, blocks=args.block,
                block_pool=args.block_pool, prefetch_views=loaded.prefetch,
            )  # fmt: skip
            assert out.features is not None
            files = write_features(
                video, out_dir, args.format, out.features, out.blocks, {**meta, "views": out.views}
            )
        except PER_VIDEO_ERRORS as e:
            results.append({"video": video.path, "error": _message(video.path, e)})
            continue
        results.append(
            {
                "video": video.path,
                "views": out.views,
                "files": files,
                "shapes": {
                    "features": list(out.features.shape),
                    **{k: list(v.shape) for k, v in out.blocks.items()},
                },
            }
        )
    scored, failed = summary(results)
    report = {
        "weights": str(args.weights),
        **loaded.describe(),
        "format": args.format,
        "blocks": list(args.block),
        "block_pool": args.block_pool,
        "videos": results,
        "scored": scored,
        "failed": failed,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "index.json", json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"ERROR {r['error']}")  # the message names the file
            else:
                print(f"{r['video']} ({r['views']} views) -> {', '.join(r['files'])}")
    print(
        f"{PROG}: {scored} of {len(results)} videos written to {out_dir} ({failed} failed)",
        file=sys.stderr,
    )
    return 0 if scored else 1
