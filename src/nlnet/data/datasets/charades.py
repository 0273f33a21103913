"""Charades v1 (§4.3, §6.2): 157 classes, multi-label targets from timed actions."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nlnet.data import annotations as ann
from nlnet.data.datasets.clips import VideoClipDataset, VideoRecord, dataset_kwargs
from nlnet.data.registry import register_dataset
from nlnet.data.video import VIDEO_EXTENSIONS, VideoInfo


class CharadesDataset(VideoClipDataset):
    """Charades v1 (§4.3, §6.2): 157 classes, multi-label targets.

    ``labels="clip"`` (training default): the actions whose time interval overlaps the clip's;
    ``labels="video"`` (test default, as the official metric is per video): every action of the
    video.
    """

    def __init__(self, records, classes, *, labels: str | None = None, **kwargs: Any) -> None:
        super().__init__(records, classes, multi_label=True, **kwargs)
        if labels is None:
            labels = "video" if self.mode == "test" else "clip"
        if labels not in ("clip", "video"):
            raise ValueError(f"labels must be 'clip' or 'video', got {labels!r}")
        self.labels = labels

    def clip_intervals(self, info: VideoInfo, idx: list[int]) -> list[tuple[float, float]]:
        """Time intervals (s) a clip covers: one per run of increasing frames (wrap splits)."""
        step = 1.0 / (self.target_fps or info.fps or self.frame_rate)
        runs: list[list[int]] = [[idx[0]]]
        for j in idx[1:]:
            if j < runs[-1][-1]:
                runs.append([j])
            else:
                runs[-1].append(j)
        return [
            (
                info.frame_time(r[0], self.target_fps),
                info.frame_time(r[-1], self.target_fps) + step,
            )
            for r in runs
        ]

    def target(self, record: VideoRecord, info: VideoInfo | None, idx: list[int] | None):
        t = torch.zeros(self.num_classes, dtype=torch.float32)
        if self.labels == "video" or info is None or idx is None:
            for c, _, _ in record.actions:
                t[c] = 1.0
            return t
        for lo, hi in self.clip_intervals(info, idx):
            for c, s, e in record.actions:
                if s < hi and e > lo:
                    t[c] = 1.0
        return t


@register_dataset("charades")
def charades(
    root: str | os.PathLike[str],
    annotations: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    classes_file: str | os.PathLike[str] | None = None,
    labels: str | None = None,
    frames: bool | None = None,
    resize_to: int | None = 288,
    test_scale: int = 320,
    frame_rate: float = 24.0,
    **kwargs: Any,
) -> CharadesDataset:
    """Charades v1 from ``Charades_v1_{train,test}.csv`` (§6.2).

    ``root`` holds either the JPEG frame folders (``<id>/<id>-000000.jpg``, 24 fps) or the
    videos (``<id>.mp4``); ``frames=None`` picks whichever exists per video.  Class names come
    from ``classes``, ``classes_file`` or a ``Charades_v1_classes.txt`` next to the CSV
    (else ``c000``…).  Defaults follow §4.3: training crops rescaled to 288, test scale 320.
    """
    root = os.fspath(root)
    annotations = os.fspath(annotations)
    rows = ann.read_charades_csv(annotations)
    if classes is None:
        if classes_file is None:
            guess = Path(annotations).with_name("Charades_v1_classes.txt")
            classes_file = guess if guess.exists() else None
        if classes_file is not None:
            classes = ann.read_charades_classes(classes_file)
        else:
            classes = [f"c{i:03d}" for i in range(ann.CHARADES_NUM_CLASSES)]
    records = []
    for r in rows:
        folder_path = os.path.join(root, r.id)
        path = folder_path
        if frames is not True and not (frames is None and os.path.isdir(folder_path)):
            path = os.path.join(root, r.id + ".mp4")
            for ext in VIDEO_EXTENSIONS:
                if os.path.exists(os.path.join(root, r.id + ext)):
                    path = os.path.join(root, r.id + ext)
                    break
        labels_ = tuple(sorted({c for c, _, _ in r.actions}))
        records.append(VideoRecord(r.id, path, labels_, r.actions))
    return CharadesDataset(
        records,
        classes,
        labels=labels,
        resize_to=resize_to,
        test_scale=test_scale,
        frame_rate=frame_rate,
        **dataset_kwargs(kwargs),
    )
