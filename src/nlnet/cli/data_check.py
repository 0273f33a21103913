"""``nlnet data-check``: scan a Kinetics / Charades / folder download (:func:`nlnet.data.check.scan`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nlnet.data.check import scan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=("kinetics", "charades", "folder"))
    parser.add_argument("--root", required=True, help="directory holding the videos/frame folders")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--csv", help="official annotation CSV (Kinetics or Charades)")
    src.add_argument("--list", help="list file, one '<path> <label>' per line")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument(
        "--out", default="data-check", help="folder for the contact sheet and the reports"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes decoding in parallel")
    parser.add_argument(
        "--max-videos", type=int, default=None, help="check only the first N videos (quick look)"
    )
    parser.add_argument("--sheet-videos", type=int, default=8, help="rows of the contact sheet")
    parser.add_argument("--sheet-frames", type=int, default=8, help="frames per contact-sheet row")
    parser.add_argument(
        "--frame-rate", type=float, default=None, help="frame rate of frame folders (default 24)"
    )


def _fmt_range(name: str, r: dict[str, float] | None, unit: str = "") -> str:
    if r is None:
        return f"  {name:<11} -"
    return f"  {name:<11} {r['min']:.4g}{unit} .. {r['max']:.4g}{unit} (median {r['median']:.4g})"


def run(args: argparse.Namespace) -> int:
    try:
        summary = scan(
            args.dataset, args.root, args.csv or args.list, out=args.out, workers=args.workers,
            max_videos=args.max_videos, sheet_videos=args.sheet_videos,
            sheet_frames=args.sheet_frames, frame_rate=args.frame_rate,
        )  # fmt: skip
    except ValueError as e:
        print(f"nlnet data-check: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
        return 0 if summary.get("videos") else 1
    if "error" in summary:
        print(f"nlnet data-check: {summary['error']}", file=sys.stderr)
        return 1
    print(f"{summary['dataset']} at {summary['root']}")
    print(f"  listed      {summary['num_listed']}")
    print(f"  readable    {summary['num_videos']} (of {summary['num_checked']} checked)")
    print(f"  classes     {summary['num_classes']}")
    print(f"  missing     {summary['num_missing']}")
    print(f"  unreadable  {summary['num_unreadable']}")
    print(_fmt_range("duration", summary["duration_s"], " s"))
    print(_fmt_range("fps", summary["fps"]))
    print(_fmt_range("width", summary["width"]))
    print(_fmt_range("height", summary["height"]))
    for p in summary["missing_paths"][:10]:
        print(f"  missing: {p}")
    for p, why in list(summary["unreadable_reasons"].items())[:10]:
        print(f"  unreadable: {why}" if why.startswith(p) else f"  unreadable: {p}: {why}")
    print(f"  report: {Path(args.out) / 'summary.json'}")
    if summary["contact_sheet"]:
        print(f"  contact sheet: {summary['contact_sheet']}")
    return 0 if summary["videos"] else 1
