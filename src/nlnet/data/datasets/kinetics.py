"""Kinetics-400/600/700 (§4.1, §6.1): the official CSVs, list files or one folder per class."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from nlnet.data import annotations as ann
from nlnet.data.datasets.clips import VideoClipDataset, VideoRecord, dataset_kwargs
from nlnet.data.datasets.folder import folder, records_from_list
from nlnet.data.registry import register_dataset
from nlnet.data.video import VIDEO_EXTENSIONS


def _index_files(root: str, depth: int = 2) -> dict[tuple[str, str], str]:
    """``(directory relative to root, file stem) -> path`` for videos up to ``depth`` levels."""
    found: dict[tuple[str, str], str] = {}
    root = os.path.abspath(root)

    def scan(d: str, rel: str, level: int) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            if e.is_dir():
                if level < depth:
                    scan(e.path, os.path.join(rel, e.name) if rel else e.name, level + 1)
                # A frame folder stands for a video too.
                found.setdefault((rel, e.name), e.path)
            elif e.name.lower().endswith(VIDEO_EXTENSIONS):
                found.setdefault((rel, os.path.splitext(e.name)[0]), e.path)

    scan(root, "", 1)
    return found


@register_dataset("kinetics")
def kinetics(
    root: str | os.PathLike[str],
    annotations: str | os.PathLike[str] | None = None,
    *,
    classes: Sequence[str] | None = None,
    split: str | None = None,
    **kwargs: Any,
) -> VideoClipDataset:
    """Kinetics-400/600/700 (§4.1, §6.1).

    ``annotations`` is the official CSV (videos found under ``root`` with the crawler's naming
    ``<label>/<youtube_id>_<start:06d>_<end:06d>.mp4`` or the original code's
    ``<label_with_underscores>/<youtube_id>.mp4``, any video extension; test-CSV videos, which
    have no label, directly under ``root``) or a list file ``<path> <label>`` (paths relative to
    ``root``).  Without annotations, ``root`` is read as one folder per class.  ``split`` keeps
    only CSV rows of that split.  Classes are the labels in alphabetical order (or ``classes``).
    """
    root = os.fspath(root)
    if annotations is None:
        return folder(root, classes=classes, **kwargs)
    annotations = os.fspath(annotations)
    if not ann.is_kinetics_csv(annotations):
        records, names = records_from_list(root, annotations, classes)
        return VideoClipDataset(records, names, **dataset_kwargs(kwargs))
    rows = ann.read_kinetics_csv(annotations)
    if split is not None:
        rows = [r for r in rows if r.split == split]
    labelled = [r for r in rows if r.label is not None]
    if classes is None:
        classes = sorted({r.label for r in labelled if r.label is not None})
    class_index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({r.label for r in labelled if r.label not in class_index})
    if unknown:
        raise ValueError(f"{annotations}: labels {unknown[:5]} are not among the given classes")
    files = _index_files(root)
    records = []
    for r in rows:
        trimmed = f"{r.youtube_id}_{r.time_start:06d}_{r.time_end:06d}"
        dirs = [""] if r.label is None else [r.label, r.label.replace(" ", "_"), ""]
        path = None
        for d in dirs:
            for stem in (trimmed, r.youtube_id):
                path = files.get((d, stem))
                if path:
                    break
            if path:
                break
        if path is None:  # reported missing: the crawler's expected location
            path = os.path.join(root, dirs[0], trimmed + ".mp4")
        labels = () if r.label is None else (class_index[r.label],)
        records.append(VideoRecord(r.youtube_id, path, labels))
    return VideoClipDataset(records, classes, **dataset_kwargs(kwargs))
