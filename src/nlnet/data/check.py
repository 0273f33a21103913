"""``nlnet data-check``: scan a video download before training on it (§5.6: ~5% of Kinetics is lost).

Reports the number of videos and classes, the videos listed but missing on disk, the ones that
cannot be decoded (with the reason), and the ranges of duration, frame rate and resolution; writes
a contact sheet PNG of frames sampled from a few videos so a wrong layout or colour order shows.
With ``--json`` the summary is one JSON object on stdout (``videos``: readable ids, ``classes``,
``missing``: ids, ``unreadable``: paths, plus ``unreadable_reasons`` and the ranges).
"""

from __future__ import annotations

import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from nlnet.data.video import VideoDecodeError, decode_frames, probe_video
from nlnet.io import atomic_write, atomic_write_text


def check_video(path: str, frame_rate: float = 24.0) -> dict[str, Any]:
    """Probe ``path`` and decode its first, middle and last frames."""
    try:
        info = probe_video(path, frame_rate=frame_rate)
        n = info.num_frames
        decode_frames(info, sorted({0, n // 2, n - 1}))
    except VideoDecodeError as e:
        return {"path": path, "ok": False, "reason": str(e)}
    except Exception as e:  # anything else a broken file can raise is still "unreadable"
        return {"path": path, "ok": False, "reason": f"{type(e).__name__}: {e}"}
    return {
        "path": path,
        "ok": True,
        "frames": info.num_frames,
        "duration": info.duration,
        "fps": info.fps,
        "width": info.width,
        "height": info.height,
    }


def _range(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {
        "min": float(a.min()),
        "max": float(a.max()),
        "mean": float(a.mean()),
        "median": float(np.median(a)),
    }


def contact_sheet(
    rows: list[tuple[str, str]], out: Path, frames_per_row: int = 8, frame_rate: float = 24.0
) -> Path | None:
    """A PNG grid: one row per ``(path, caption)``, ``frames_per_row`` evenly spaced frames."""
    from PIL import Image, ImageDraw

    thumbs: list[tuple[str, list[Image.Image]]] = []
    height = 72
    for path, caption in rows:
        try:
            info = probe_video(path, frame_rate=frame_rate)
            idx = [
                min(info.num_frames - 1, (k * info.num_frames) // frames_per_row)
                for k in range(frames_per_row)
            ]
            frames = decode_frames(info, idx)
        except VideoDecodeError:
            continue
        ims = []
        for f in frames:
            im = Image.fromarray(f)
            w = max(1, round(im.width * height / im.height))
            ims.append(im.resize((w, height), Image.BILINEAR))
        thumbs.append((caption, ims))
    if not thumbs:
        return None
    cap_h = 14
    width = max(sum(im.width for im in ims) for _, ims in thumbs)
    sheet = Image.new("RGB", (width, len(thumbs) * (height + cap_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for caption, ims in thumbs:
        draw.text((2, y + 1), caption[:120], fill=(0, 0, 0))
        x = 0
        for im in ims:
            sheet.paste(im, (x, y + cap_h))
            x += im.width
        y += height + cap_h
    with atomic_write(out) as fh:
        sheet.save(fh, format="PNG")
    return out


def scan(
    dataset: str,
    root: str | os.PathLike[str],
    annotations: str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str] = "data-check",
    workers: int = 1,
    max_videos: int | None = None,
    sheet_videos: int = 8,
    sheet_frames: int = 8,
    frame_rate: float | None = None,
) -> dict[str, Any]:
    """Check every video of a ``dataset`` download at ``root``; write the reports under ``out``.

    ``annotations`` is the official CSV or a list file (required for Charades).  Returns the
    summary (also written to ``out/summary.json``), or ``{"error": ...}`` when no listed video
    exists on disk.
    """
    from tqdm import tqdm

    from nlnet.data.registry import build_dataset

    kwargs: dict[str, Any] = {"root": root, "mode": "test", "num_clips": 1}
    if annotations is not None:
        kwargs["annotations"] = annotations
    elif dataset == "charades":
        raise ValueError("--dataset charades needs --csv Charades_v1_*.csv")
    if frame_rate is not None:
        kwargs["frame_rate"] = frame_rate
    try:
        ds = build_dataset(dataset, **kwargs)
    except FileNotFoundError as e:
        return {"error": str(e), "videos": [], "classes": [], "missing": [], "unreadable": []}
    records = ds.records[:max_videos] if max_videos else ds.records
    paths = [r.path for r in records]
    results: list[dict[str, Any]]
    bar = dict(total=len(paths), desc="checking videos", unit="video", file=sys.stderr)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            it = pool.map(check_video, paths, [ds.frame_rate] * len(paths), chunksize=8)
            results = list(tqdm(it, **bar))
    else:
        results = [check_video(p, ds.frame_rate) for p in tqdm(paths, **bar)]
    ok = [(r, res) for r, res in zip(records, results) if res["ok"]]
    bad = [res for res in results if not res["ok"]]
    summary: dict[str, Any] = {
        "dataset": dataset,
        "root": os.path.abspath(root),
        "annotations": None if annotations is None else str(annotations),
        "num_listed": len(ds.records) + len(ds.missing),
        "num_checked": len(records),
        "num_videos": len(ok),
        "num_classes": ds.num_classes,
        "num_missing": len(ds.missing),
        "num_unreadable": len(bad),
        "videos": [r.id for r, _ in ok],
        "classes": list(ds.classes),
        "missing": list(ds.missing),
        "missing_paths": list(ds.missing_paths),
        "unreadable": [res["path"] for res in bad],
        "unreadable_reasons": {res["path"]: res["reason"] for res in bad},
        "duration_s": _range([res["duration"] for _, res in ok]),
        "fps": _range([res["fps"] for _, res in ok]),
        "frames": _range([res["frames"] for _, res in ok]),
        "width": _range([res["width"] for _, res in ok]),
        "height": _range([res["height"] for _, res in ok]),
    }
    out = Path(out)
    picks = ok[:: max(1, math.ceil(len(ok) / max(1, sheet_videos)))][:sheet_videos]
    captions = []
    for r, _ in picks:
        names = ", ".join(ds.classes[c] for c in r.labels[:3]) if r.labels else "-"
        captions.append((r.path, f"{r.id}  [{names}]"))
    sheet = contact_sheet(captions, out / "contact_sheet.png", sheet_frames, ds.frame_rate)
    summary["contact_sheet"] = str(sheet) if sheet else None
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary
