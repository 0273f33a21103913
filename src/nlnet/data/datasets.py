"""Video clip datasets: Kinetics (§4.1–4.2), Charades (§4.3) and a folder-per-class dataset.

All follow the item contract of :mod:`nlnet.data.registry`.  Modes:

* ``"train"``: one clip per video, random start (wrapping for short videos), scale jitter,
  random crop and flip (§4.1).  A video that fails to decode is logged, counted in
  ``dataset.failures`` and replaced by another random video (at most ``max_retries`` times).
* ``"val"``: the original code's validation during training (§4.2): one clip per video with the
  training augmentation, drawn from a generator seeded by ``(val_seed, index)`` so that every
  validation pass sees the same clips.
* ``"test"``: ``num_clips`` clips evenly spaced in time × the spatial views of ``test_crop``;
  item ``n`` is video ``n // V``, view ``n % V`` (``V = num_clips × crops``), view
  ``v = clip * crops + crop``.

In val/test a video that fails to decode gives a zero clip with ``valid=False``.  Videos listed in
the annotations but absent on disk are dropped at construction, listed in ``dataset.missing`` and
written to ``missing_report``.

Datasets hold only plain Python data: containers are opened inside ``__getitem__``, so they
pickle cheaply into DataLoader workers.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from nlnet.data import annotations as ann
from nlnet.data.registry import register_dataset
from nlnet.data.sampling import clip_indices, evenly_spaced_clip_start, train_clip_start
from nlnet.data.transforms import eval_transform, mean_std, num_eval_views, train_transform
from nlnet.data.video import (
    FRAME_EXTENSIONS,
    VIDEO_EXTENSIONS,
    VideoDecodeError,
    VideoInfo,
    decode_frames,
    probe_video,
)
from nlnet.io import atomic_write_text

log = logging.getLogger("nlnet.data")

MODES = ("train", "val", "test")


@dataclass(frozen=True)
class VideoRecord:
    """One video: its id, file (or frame folder), label(s) and, for Charades, timed actions."""

    id: str
    path: str
    labels: tuple[int, ...] = ()
    actions: tuple[tuple[int, float, float], ...] = ()


def _is_clip_source(path: str) -> bool:
    """A video file, or a folder holding image frames."""
    if os.path.isfile(path):
        return True
    if os.path.isdir(path):
        with os.scandir(path) as it:
            return any(e.name.lower().endswith(FRAME_EXTENSIONS) for e in it)
    return False


class VideoClipDataset(Dataset):
    """Clips of a list of videos, sampled and transformed as in the paper (see module doc).

    Args (the keyword arguments shared by every registered video dataset):
        records: the videos.  classes: class names (``num_classes = len(classes)``).
        mode: ``"train"``, ``"val"`` or ``"test"``.
        clip_length, sampling_rate: L frames every s frames (32, 2).
        num_clips: test clips per video (10).  test_crop: ``"three"``, ``"full"``, ``"center"``.
        crop_size: training crop (224).  resize_to: rescale the crop window to this size
            (Charades 288; None = no rescaling).  jitter: shorter-side range ((256, 320)).
        test_scale: test shorter side (256).  test_crop_size: test crop side (None = test_scale).
        normalization: ``"original"`` (114.75, 57.375) or ``"imagenet"``.
        target_fps: read videos at this frame rate (None = native rate, the original code).
        frame_rate: frame rate of frame folders (24, Charades).
        max_retries: training replacements after decode failures before giving up.
        missing_report: file that receives the list of missing videos (None = not written).
        multi_label: targets are multi-hot float vectors.
        decoder_threads: FFmpeg threads per decode (1 suits DataLoader workers).
        val_seed: seed of the fixed validation draws.
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        classes: Sequence[str],
        *,
        mode: str = "train",
        clip_length: int = 32,
        sampling_rate: int = 2,
        num_clips: int = 10,
        test_crop: str = "three",
        crop_size: int = 224,
        resize_to: int | None = None,
        jitter: tuple[int, int] | Sequence[int] = (256, 320),
        test_scale: int = 256,
        test_crop_size: int | None = None,
        normalization: str = "original",
        target_fps: float | None = None,
        frame_rate: float = 24.0,
        max_retries: int = 10,
        missing_report: str | os.PathLike[str] | None = None,
        multi_label: bool = False,
        decoder_threads: int = 1,
        val_seed: int = 0,
        check_missing: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if clip_length < 1 or sampling_rate < 1 or num_clips < 1:
            raise ValueError(
                "clip_length, sampling_rate and num_clips must be >= 1, got "
                f"{clip_length}, {sampling_rate}, {num_clips}"
            )
        if len(jitter) != 2 or int(jitter[0]) > int(jitter[1]) or int(jitter[0]) < crop_size:
            raise ValueError(f"jitter must be (min, max) with {crop_size} <= min <= max: {jitter}")
        if target_fps is not None and target_fps <= 0:
            raise ValueError(f"target_fps must be positive or None, got {target_fps}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        mean_std(normalization)  # validates the name
        self.views_per_clip = num_eval_views(test_crop)
        self.mode = mode
        self.clip_length = clip_length
        self.sampling_rate = sampling_rate
        self.num_clips = num_clips
        self.test_crop = test_crop
        self.crop_size = crop_size
        self.resize_to = resize_to
        self.jitter = (int(jitter[0]), int(jitter[1]))
        self.test_scale = test_scale
        self.test_crop_size = test_crop_size
        self.normalization = normalization
        self.target_fps = target_fps
        self.frame_rate = frame_rate
        self.max_retries = max_retries
        self.multi_label = multi_label
        self.decoder_threads = decoder_threads
        self.val_seed = val_seed
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        bad = [r for r in records for c in r.labels if not 0 <= c < self.num_classes]
        if bad:
            raise ValueError(
                f"video {bad[0].id!r} has label(s) {bad[0].labels} outside "
                f"[0, {self.num_classes}) ({len(bad)} such videos)"
            )
        present: list[VideoRecord] = []
        self.missing: list[str] = []
        self.missing_paths: list[str] = []
        for r in records:
            if not check_missing or _is_clip_source(r.path):
                present.append(r)
            else:
                self.missing.append(r.id)
                self.missing_paths.append(r.path)
        if self.missing:
            log.warning(
                "%d of %d listed videos are missing on disk (e.g. %s)",
                len(self.missing),
                len(records),
                self.missing_paths[0],
            )
        if missing_report is not None:
            atomic_write_text(
                missing_report,
                "".join(f"{i}\t{p}\n" for i, p in zip(self.missing, self.missing_paths)),
            )
        if not present:
            raise FileNotFoundError(
                f"none of the {len(records)} listed videos exist on disk"
                + (f" (first expected at {self.missing_paths[0]})" if self.missing_paths else "")
            )
        self.records = present
        self.videos = [r.id for r in present]
        self.failures: dict[str, int] = {}  # path -> decode failures in this process
        self.failure_reasons: dict[str, str] = {}
        self._info_cache: OrderedDict[str, VideoInfo] = OrderedDict()
        self._last_clip: tuple[Any, ...] | None = None

    # -- sizes -------------------------------------------------------------------------------
    @property
    def views_per_video(self) -> int:
        return self.num_clips * self.views_per_clip if self.mode == "test" else 1

    def __len__(self) -> int:
        return len(self.records) * self.views_per_video

    @property
    def failure_count(self) -> int:
        return sum(self.failures.values())

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_info_cache"] = OrderedDict()
        state["_last_clip"] = None
        return state

    # -- reading ----------------------------------------------------------------------------
    def probe(self, path: str) -> VideoInfo:
        """Frame count and timestamps of ``path`` (a small per-process LRU cache)."""
        info = self._info_cache.get(path)
        if info is None:
            info = probe_video(path, frame_rate=self.frame_rate)
            self._info_cache[path] = info
            if len(self._info_cache) > 512:
                self._info_cache.popitem(last=False)
        else:
            self._info_cache.move_to_end(path)
        return info

    def read_clip(self, path: str, start: int | None, generator: torch.Generator | None):
        """Decode one clip of ``path``: ``start=None`` draws a training start.

        Returns ``(frames uint8 (T, H, W, 3), info, indices at target_fps)``.
        """
        info = self.probe(path)
        n = info.num_frames_at(self.target_fps)
        if start is None:
            start = train_clip_start(n, self.clip_length, self.sampling_rate, generator)
        idx = clip_indices(start, n, self.clip_length, self.sampling_rate)
        native = [info.native_index(j, self.target_fps) for j in idx]
        frames = decode_frames(info, native, threads=self.decoder_threads)
        return frames, info, idx

    def target(self, record: VideoRecord, info: VideoInfo | None, idx: list[int] | None):
        """Target of a clip: class index, or multi-hot labels of the video (Charades overrides)."""
        if self.multi_label:
            t = torch.zeros(self.num_classes, dtype=torch.float32)
            t[list(record.labels)] = 1.0
            return t
        return torch.tensor(record.labels[0] if record.labels else -1, dtype=torch.int64)

    def _fail(self, path: str, err: Exception) -> None:
        self.failures[path] = self.failures.get(path, 0) + 1
        self.failure_reasons[path] = str(err)
        log.warning("unreadable video (%s mode): %s", self.mode, err)  # err names the file

    # -- items ------------------------------------------------------------------------------
    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, tuple):
            index, seed = key
            generator: torch.Generator | None = torch.Generator().manual_seed(int(seed))
        else:
            index, generator = key, None
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} outside [0, {len(self)})")
        if self.mode == "train":
            return self._train_item(index, generator)
        if self.mode == "val":
            if generator is None:
                generator = torch.Generator().manual_seed(self.val_seed * 1_000_003 + index)
            return self._val_item(index, generator)
        return self._test_item(index)

    def _train_clip(self, frames: np.ndarray, generator: torch.Generator | None) -> torch.Tensor:
        return train_transform(
            frames,
            jitter=self.jitter,
            crop_size=self.crop_size,
            resize_to=self.resize_to,
            normalization=self.normalization,
            generator=generator,
        )

    def _train_item(self, index: int, generator: torch.Generator | None) -> dict[str, Any]:
        tried: list[str] = []
        video = index
        for _ in range(self.max_retries + 1):
            record = self.records[video]
            try:
                frames, info, idx = self.read_clip(record.path, None, generator)
            except VideoDecodeError as e:
                self._fail(record.path, e)
                tried.append(str(e))
                # Replacement drawn from the item's own generator (not from a per-process list
                # of known-bad videos) so a seeded item is the same in whichever worker.
                video = int(torch.randint(len(self.records), (1,), generator=generator))
                continue
            return {
                "clip": self._train_clip(frames, generator),
                "target": self.target(record, info, idx),
                "index": video,
                "view": 0,
                "valid": True,
            }
        raise RuntimeError(
            f"{len(tried)} videos in a row could not be decoded (max_retries={self.max_retries}); "
            "is the data readable? Run `nlnet data-check`. Failures:\n  " + "\n  ".join(tried)
        )

    def _invalid(self, record: VideoRecord, index: int, view: int, size: tuple[int, int]):
        # The evaluator must not score this view; the zeros only keep the batch shape.
        h, w = size
        return {
            "clip": torch.zeros(3, self.clip_length, h, w),
            "target": self.target(record, None, None),
            "index": index,
            "view": view,
            "valid": False,
        }

    def _val_item(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        record = self.records[index]
        try:
            frames, info, idx = self.read_clip(record.path, None, generator)
        except VideoDecodeError as e:
            self._fail(record.path, e)
            size = self.resize_to or self.crop_size
            return self._invalid(record, index, 0, (size, size))
        return {
            "clip": self._train_clip(frames, generator),
            "target": self.target(record, info, idx),
            "index": index,
            "view": 0,
            "valid": True,
        }

    def _test_item(self, index: int) -> dict[str, Any]:
        video, view = divmod(index, self.views_per_video)
        clip_k, crop_v = divmod(view, self.views_per_clip)
        record = self.records[video]
        # Views of one clip are consecutive items: decode the clip once for its crops.
        if self._last_clip is not None and self._last_clip[:2] == (video, clip_k):
            frames, info, idx = self._last_clip[2:]
        else:
            try:
                info = self.probe(record.path)
                n = info.num_frames_at(self.target_fps)
                start = evenly_spaced_clip_start(n, self.num_clips, clip_k)
                frames, info, idx = self.read_clip(record.path, start, None)
            except VideoDecodeError as e:
                self._fail(record.path, e)
                size = self.test_crop_size or self.test_scale
                return self._invalid(record, video, view, (size, size))
            self._last_clip = (video, clip_k, frames, info, idx)
        clip = eval_transform(
            frames,
            scale=self.test_scale,
            test_crop=self.test_crop,
            view=crop_v,
            crop_size=self.test_crop_size,
            normalization=self.normalization,
        )
        return {
            "clip": clip,
            "target": self.target(record, info, idx),
            "index": video,
            "view": view,
            "valid": True,
        }


# -- file discovery ------------------------------------------------------------------------------


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


def _resolve(root: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(root, path)


def _records_from_list(
    root: str, list_file: str, classes: Sequence[str] | None
) -> tuple[list[VideoRecord], list[str]]:
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


def _common(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    if "jitter" in kwargs and kwargs["jitter"] is not None:
        kwargs["jitter"] = tuple(kwargs["jitter"])
    return kwargs


# -- the registered datasets -------------------------------------------------------------------


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
        records, names = _records_from_list(root, annotations, classes)
        return VideoClipDataset(records, names, **_common(kwargs))
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
    return VideoClipDataset(records, classes, **_common(kwargs))


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
        records, names = _records_from_list(root, os.fspath(annotations), classes)
        return VideoClipDataset(records, names, frame_rate=frame_rate, **_common(kwargs))
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
    return VideoClipDataset(records, classes, frame_rate=frame_rate, **_common(kwargs))


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
        **_common(kwargs),
    )
