"""The clip dataset every video data set is built on (§4.1–4.2): decoding, sampling, views.

The per-dataset file discovery lives beside it (:mod:`.kinetics`, :mod:`.charades`,
:mod:`.folder`).  All follow the item contract of :mod:`nlnet.data.registry`.  Modes:

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
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from nlnet.data.sampling import clip_indices, evenly_spaced_clip_start, train_clip_start
from nlnet.data.transforms import eval_transform, mean_std, num_eval_views, train_transform
from nlnet.data.video import (
    FRAME_EXTENSIONS,
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


def dataset_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Builder keyword arguments for :class:`VideoClipDataset` (``jitter`` as a tuple)."""
    kwargs = dict(kwargs)
    if "jitter" in kwargs and kwargs["jitter"] is not None:
        kwargs["jitter"] = tuple(kwargs["jitter"])
    return kwargs
