"""Your own videos: one folder per class, or a list file ``<path> <label>``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nlnet.data import annotations as ann
from nlnet.data.datasets.clips import VideoClipDataset, VideoRecord, dataset_kwargs
from nlnet.data.registry import register_dataset
from nlnet.data.video import VIDEO_EXTENSIONS


def _resolve(root: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(root, path)


def records_from_list(
    root: str, list_file: str, classes: Sequence[str] | None
) -> tuple[list[VideoRecord], list[str]]:
    """Records and class names from a list file ``<path> <label>`` (paths relative to ``root``)."""
    rows = ann.read_list_file(list_file)
    records = [VideoRecord(p, _resolve(root, p), tuple(labels)) for p, labels in rows]
    if classes is None:
        # Name classes after the folders their videos sit in when that is unambiguous
        # (the original lists: <class_with_underscores>/<youtube_id>.mp4).
        n = max(c for r in records for c in r.labels) + 1
        names: dict[int, set[str]] = {}
        for r in records:
            if len(r.labels) == 1:
                names.setdefault(r.labels[0], set()).add(Path(r.path).parent.name)
        if len(names) == n and all(len(v) == 1 for v in names.values()):
            classes = [next(iter(names[i])) for i in range(n)]
        else:
            classes = [str(i) for i in range(n)]
    return records, list(classes)


@register_dataset("folder")
def folder(
    root: str | os.PathLike[str],
    annotations: str | os.PathLike[str] | None = None,
    *,
    classes: Sequence[str] | None = None,
    frame_rate: float = 30.0,
    **kwargs: Any,
) -> VideoClipDataset:
    """Your own videos: ``root/<class>/<video file or frame folder>``, classes in sorted order.

    With ``annotations`` (a list file ``<path> <label>``) the list decides instead.  Frame
    folders are read at ``frame_rate``.
    """
    root = os.fspath(root)
    if annotations is not None:
        records, names = records_from_list(root, os.fspath(annotations), classes)
        return VideoClipDataset(records, names, frame_rate=frame_rate, **dataset_kwargs(kwargs))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset root {root!r} is not a directory")
    dirs = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if classes is None:
        classes = dirs
    class_index = {c: i for i, c in enumerate(classes)}
    records = []
    for d in dirs:
        if d not in class_index:
            raise ValueError(f"folder {d!r} under {root} is not one of the given classes")
        for e in sorted(os.scandir(os.path.join(root, d)), key=lambda e: e.name):
            if e.name.lower().endswith(VIDEO_EXTENSIONS) or e.is_dir():
                records.append(VideoRecord(f"{d}/{e.name}", e.path, (class_index[d],)))
    if not records:
        raise FileNotFoundError(
            f"no videos under {root}: expected <class>/<video{'|'.join(VIDEO_EXTENSIONS)}> "
            "or <class>/<frame folder>"
        )
    return VideoClipDataset(records, classes, frame_rate=frame_rate, **dataset_kwargs(kwargs))
