"""``nlnet detect``: draw a detector's boxes, masks and keypoints on images
(:mod:`nlnet.detection.detect`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from nlnet.detection.data import read_rgb
from nlnet.detection.detect import draw_detections, load_detector_checkpoint, write_png
from nlnet.io import atomic_write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files (JPEG/PNG)")
    parser.add_argument("--checkpoint", required=True, help="engine checkpoint or state dict")
    parser.add_argument("--out", required=True, help="output folder for <image>.png / .json")
    parser.add_argument("--model", default=None, help="detector name (for plain state dicts)")
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument(
        "--min-size", type=int, default=None, help="shorter side (default: model's)"
    )
    parser.add_argument("--max-size", type=int, default=None, help="longer side cap")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def run(args: argparse.Namespace) -> int:
    overrides = {
        k: v for k, v in (("min_size", args.min_size), ("max_size", args.max_size)) if v is not None
    }
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    try:
        model, names = load_detector_checkpoint(args.checkpoint, args.model, **overrides)
    except (FileNotFoundError, ValueError) as e:
        print(f"nlnet detect: {e}", file=sys.stderr)
        return 2
    model.to(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    for path_text in tqdm(
        args.images, desc="detect", file=sys.stderr, disable=len(args.images) < 2
    ):
        path = Path(path_text)
        if not path.is_file():
            print(f"nlnet detect: image not found: {path}", file=sys.stderr)
            return 2
        image = read_rgb(path)
        with torch.no_grad():
            det = model([image.to(device).float().div(255.0)])[0]
        det = {k: v.cpu() for k, v in det.items()}
        drawn = draw_detections(image, det, names, score_threshold=args.score_threshold)
        write_png(drawn, out / f"{path.stem}.png")
        keep = det["scores"] >= args.score_threshold
        records = [
            {
                "label": int(lab),
                "category": names.get(int(lab), str(int(lab))),
                "score": round(float(s), 4),
                "box_xyxy": [round(float(v), 2) for v in box],
            }
            for lab, s, box in zip(det["labels"][keep], det["scores"][keep], det["boxes"][keep])
        ]
        if "keypoints" in det:
            for r, kp in zip(records, det["keypoints"][keep]):
                r["keypoints"] = [[round(float(x), 2), round(float(y), 2)] for x, y, _ in kp]
        atomic_write_text(out / f"{path.stem}.json", json.dumps(records, indent=1))
        print(f"{path}: {len(records)} detection(s) -> {out / (path.stem + '.png')}")
    return 0
