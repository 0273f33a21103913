"""Decoding only the frames a clip needs (§4.1; the original code's decoder is §5.6).

The original Caffe2 op decodes *every* frame of a video at its native rate and then keeps 32 of
them.  Here a clip is read by seeking once to the key frame before its first frame and decoding
forward: frames that no other frame references (and that the clip does not use) are skipped by
the codec, the decoder is drained as soon as the clip's last frame has been sent to it, and only
the kept frames are converted to RGB, by one converter for the whole clip.  The frames are
identical, pixel for pixel, to decoding every frame with ``frame.to_ndarray(format="rgb24")``
(:func:`decode_all_frames`; ``tests/data/test_data_decode.py``).  Decoding needs the reference frames
from that key frame on, so with x264's default key-frame interval (250 frames) most of the work
is decoding the references before the clip.

Frame numbering
---------------
*Native rate* (``target_fps=None``, the original code's behaviour): frame ``i`` is the ``i``-th
frame in presentation order, i.e. the frame with the ``i``-th smallest presentation timestamp
(pts) of the video stream.  The timestamps come from the container's index when it lists every
frame at a constant rate (MP4), else from one demux pass over the packets (no decoding), so
variable-frame-rate videos are numbered exactly as a decoder would output them.
The frame's time in seconds is ``(pts[i] - pts[0]) * time_base``.

*Fixed rate* (``target_fps=r``): frame ``j`` is the native frame on screen at time
``t_j = j / r`` (seconds from the first frame), i.e. the last native frame whose time is
``<= t_j``; the video has ``floor(duration * r)`` such frames (at least one), where ``duration``
runs from the first frame to the end of the last one.  Frames are repeated or dropped as needed,
by timestamps, so this also handles variable frame rates.

Frame folders (Charades ships JPEG frames at 24 fps): frame ``i`` is the ``i``-th ``.jpg`` of the
folder in sorted name order, at time ``i / frame_rate``.
"""

from __future__ import annotations

import bisect
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Needed frames further apart than this (in native frames) are read with a second seek rather
# than by decoding through the gap.
_SEEK_GAP = 96


class VideoDecodeError(RuntimeError):
    """A video (or frame folder) could not be read; the message says which file and why."""


@dataclass(frozen=True)
class VideoInfo:
    """What the sampler needs to know about one video or frame folder.

    ``times`` are the presentation times in seconds of the native frames, from 0, sorted.
    ``pts`` are the same in stream time-base units (empty for frame folders).
    """

    path: str
    num_frames: int
    fps: float
    duration: float
    width: int
    height: int
    times: tuple[float, ...]
    pts: tuple[int, ...] = ()
    frames: tuple[str, ...] = ()  # file names, for frame folders

    @property
    def is_frame_folder(self) -> bool:
        return bool(self.frames)

    def num_frames_at(self, target_fps: float | None) -> int:
        """Number of frames when the video is read at ``target_fps`` (None = native rate)."""
        if target_fps is None:
            return self.num_frames
        if target_fps <= 0:
            raise ValueError(f"target_fps must be positive, got {target_fps}")
        return max(1, int(self.duration * target_fps + 1e-6))

    def native_index(self, index: int, target_fps: float | None) -> int:
        """The native frame shown as frame ``index`` of the video read at ``target_fps``."""
        if target_fps is None:
            return index
        t = index / target_fps
        return max(0, bisect.bisect_right(self.times, t + 1e-9) - 1)

    def frame_time(self, index: int, target_fps: float | None) -> float:
        """Time in seconds (from the first frame) of frame ``index`` at ``target_fps``."""
        if target_fps is None:
            return self.times[index]
        return index / target_fps


def _open(path: str):  # -> av.container.InputContainer
    import av

    if not os.path.exists(path):
        raise VideoDecodeError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(f"{path}: empty file (0 bytes)")
    try:
        container = av.open(path, metadata_errors="ignore")
    except Exception as e:  # PyAV raises several FFmpeg error types (InvalidDataError, ...)
        raise VideoDecodeError(f"{path}: cannot open ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: no video stream")
    return container


def probe_video(path: str | os.PathLike[str], *, frame_rate: float = 24.0) -> VideoInfo:
    """Count the frames of ``path`` by their timestamps (container index or demux; no decoding).

    Works on video files and on frame folders (a directory of ``.jpg``/``.png`` files, read as a
    video at ``frame_rate``).
    Raises :class:`VideoDecodeError` naming the file when it cannot be read.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return probe_frame_folder(path, frame_rate)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        pts = _pts_from_index(stream)
        if pts is None:
            pts = _pts_from_demux(container, stream, path)
        if not pts:
            raise VideoDecodeError(f"{path}: the video stream has no frames")
        tb = stream.time_base or Fraction(1, 1)
        times = tuple(float((p - pts[0]) * tb) for p in pts)
        if len(times) > 1:
            last = float(np.median(np.diff(np.asarray(times))))
        else:
            rate = stream.average_rate or stream.guessed_rate or 25
            last = 1.0 / float(rate)
        duration = times[-1] + last
        width = stream.codec_context.width
        height = stream.codec_context.height
        fps = len(times) / duration if duration > 0 else float(stream.average_rate or 0)
        return VideoInfo(path, len(times), fps, duration, width, height, times, tuple(pts))
    finally:
        container.close()


def _pts_from_index(stream) -> list[int] | None:
    """Frame timestamps from the container's index (MP4/MOV: one entry per frame, no file read).

    The index holds *decode* timestamps.  For a constant frame rate the presentation timestamps
    are the same evenly spaced sequence shifted to start at the stream's start time, so the
    index is used only then: one entry per frame, none to discard, evenly spaced.  Anything else
    (variable frame rate, key-frame-only indexes as in MKV) returns None: demux instead.
    """
    try:
        entries = stream.index_entries
        n = len(entries)
        if n < 2 or stream.start_time is None or (stream.frames and stream.frames != n):
            return None
        dts = [e.timestamp for e in entries]
        if any(e.is_discard for e in entries):
            return None
    except Exception:
        return None
    step = dts[1] - dts[0]
    if step <= 0 or any(b - a != step for a, b in itertools.pairwise(dts)):
        return None
    return [stream.start_time + d - dts[0] for d in dts]


def _pts_from_demux(container, stream, path: str) -> list[int]:
    """Presentation timestamps of every frame, by reading the packets (no decoding)."""
    pts: list[int] = []
    try:
        for packet in container.demux(stream):
            if packet.is_discard:  # decoded but never shown (edit-list pre-roll)
                continue
            if packet.pts is not None:
                pts.append(int(packet.pts))
            elif packet.dts is not None and packet.size:
                pts.append(int(packet.dts))
    except Exception as e:
        raise VideoDecodeError(f"{path}: corrupt data ({type(e).__name__}: {e})") from e
    pts.sort()
    return pts


def probe_frame_folder(path: str, frame_rate: float = 24.0) -> VideoInfo:
    """Frame folder ``path`` (sorted image files) as a video at ``frame_rate``."""
    from PIL import Image

    try:
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(FRAME_EXTENSIONS))
    except OSError as e:
        raise VideoDecodeError(f"{path}: cannot list frames ({e})") from e
    if not names:
        raise VideoDecodeError(f"{path}: no .jpg/.png frames in the folder")
    try:
        with Image.open(os.path.join(path, names[0])) as im:
            width, height = im.size
    except Exception as e:
        raise VideoDecodeError(f"{path}/{names[0]}: cannot read ({e})") from e
    n = len(names)
    times = tuple(i / frame_rate for i in range(n))
    return VideoInfo(path, n, frame_rate, n / frame_rate, width, height, times, (), tuple(names))


def _runs(sorted_indices: Sequence[int], gap: int) -> list[list[int]]:
    runs: list[list[int]] = [[sorted_indices[0]]]
    for i in sorted_indices[1:]:
        if i - runs[-1][-1] > gap:
            runs.append([i])
        else:
            runs[-1].append(i)
    return runs


def decode_frames(info: VideoInfo, indices: Sequence[int], *, threads: int = 1) -> np.ndarray:
    """Decode native frames ``indices`` (any order, repeats allowed) of a probed video.

    Returns a ``(len(indices), H, W, 3)`` uint8 RGB array in the order of ``indices``.  For each
    run of nearby needed frames it seeks to the key frame at or before the run's first frame and
    stops decoding after its last one; unneeded frames that no other frame references are
    skipped by the codec (``skip_frame="NONREF"``), and only needed frames are converted to RGB.
    ``threads`` > 1 lets FFmpeg decode with several threads (frame threading, same frames);
    with as many DataLoader workers as cores keep 1: the threads would only compete for them.
    """
    if not len(indices):
        raise ValueError("decode_frames needs at least one frame index")
    bad = [i for i in indices if not 0 <= i < info.num_frames]
    if bad:
        raise IndexError(f"{info.path}: frame indices {bad[:5]} outside [0, {info.num_frames})")
    if info.is_frame_folder:
        return _read_frame_folder(info, indices)
    wanted = sorted(set(int(i) for i in indices))
    got: dict[int, np.ndarray] = {}
    to_rgb = _RGBConverter()
    container = _open(info.path)
    try:
        stream = container.streams.video[0]
        stream.thread_count = max(1, threads)
        stream.thread_type = "AUTO" if threads > 1 else "SLICE"
        for run in _runs(wanted, _SEEK_GAP):
            # Containers index key frames by decode time, which can trail presentation time by a
            # few frames (B-frames): if the seek lands after the run's first frame, seek again
            # from earlier, and as a last resort from the start.
            for back in (2, 32, run[0]):
                if _decode_run(container, stream, info, run, max(0, run[0] - back), got, to_rgb):
                    break
    finally:
        container.close()
    missing = [i for i in wanted if i not in got]
    if missing:
        raise VideoDecodeError(
            f"{info.path}: decoded {len(wanted) - len(missing)} of {len(wanted)} needed frames "
            f"(frames {missing[:5]}... could not be decoded; truncated file?)"
        )
    first = got[wanted[0]]
    odd = [i for i in wanted if got[i].shape != first.shape]
    if odd:
        raise VideoDecodeError(
            f"{info.path}: frame size changes inside the clip ({first.shape[1]}x{first.shape[0]}"
            f" at frame {wanted[0]}, {got[odd[0]].shape[1]}x{got[odd[0]].shape[0]} at {odd[0]})"
        )
    out = np.empty((len(indices), *first.shape), dtype=np.uint8)
    for k, i in enumerate(indices):
        out[k] = got[int(i)]
    return out


def decode_all_frames(path: str | os.PathLike[str], *, threads: int = 1) -> np.ndarray:
    """Every frame of ``path`` at its native rate, as RGB: the original code's way (§5.6).

    Kept as the reference the benchmark and tests compare :func:`decode_frames` against.
    """
    container = _open(os.fspath(path))
    try:
        stream = container.streams.video[0]
        stream.thread_count = max(1, threads)
        stream.thread_type = "AUTO" if threads > 1 else "SLICE"
        frames = [(f.pts, f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
    except Exception as e:
        raise VideoDecodeError(f"{path}: decoding failed ({type(e).__name__}: {e})") from e
    finally:
        container.close()
    if not frames:
        raise VideoDecodeError(f"{path}: no frames decoded")
    frames.sort(key=lambda pf: -1 if pf[0] is None else pf[0])
    return np.stack([f for _, f in frames])


class _RGBConverter:
    """``frame.to_ndarray(format="rgb24")`` with one swscale context for every frame of a clip.

    ``VideoFrame.to_ndarray(format=...)`` builds a new converter for each frame (PyAV keeps it on
    the frame); reusing one gives the same pixels without setting up a scaler 32 times.  One
    scaler thread: decoding runs in DataLoader workers that already use every core.
    """

    def __init__(self) -> None:
        from av.video.reformatter import VideoReformatter

        self._reformatter = VideoReformatter()
        self._kwargs: dict[str, object] = {"format": "rgb24", "threads": 1}

    def __call__(self, frame) -> np.ndarray:
        try:
            return self._reformatter.reformat(frame, **self._kwargs).to_ndarray()
        except TypeError:  # PyAV < 14: no ``threads`` argument
            if "threads" not in self._kwargs:
                raise
            self._kwargs = {"format": "rgb24"}
            return self._reformatter.reformat(frame, **self._kwargs).to_ndarray()


def _decode_run(
    container, stream, info: VideoInfo, run: list[int], seek_index: int, got, to_rgb
) -> bool:
    """Decode the frames ``run`` after seeking to frame ``seek_index``; False if it seeked too far.

    Packets of frames the run does not use are decoded only if other frames reference them
    (``skip_frame="NONREF"`` otherwise).  Once every needed frame's packet has been sent, the
    decoder is drained instead of decoding the packets that follow (with B-frames a decoder
    holds back a few frames; draining releases them without decoding anything more).
    """
    first_pts, last_pts = info.pts[run[0]], info.pts[run[-1]]
    need = {info.pts[i]: i for i in run}
    unsent = set(need)
    ctx = stream.codec_context
    container.seek(info.pts[seek_index], stream=stream, backward=True, any_frame=False)
    ctx.flush_buffers()
    first_seen: int | None = None

    def take(frames) -> bool | None:
        """Keep the needed ``frames``; None if the seek landed too late, else True when done."""
        nonlocal first_seen
        done = False
        for frame in frames:
            p = frame.pts
            if p is None:
                continue
            if first_seen is None:
                first_seen = p
                if p > first_pts and seek_index > 0:
                    return None
            i = need.get(p)
            if i is not None and i not in got:
                got[i] = to_rgb(frame)
            done = done or p >= last_pts
        return done

    try:
        for packet in container.demux(stream):
            # A frame the clip does not use and no other frame references need not be decoded
            # (before the run, and between the frames of a sampling rate > 1).
            pts = packet.pts
            unused = pts is not None and pts not in need
            ctx.skip_frame = "NONREF" if unused else "DEFAULT"
            done = take(packet.decode())
            if done is None:
                return False
            if done:
                break
            if not unused and pts is not None:
                unsent.discard(pts)
                if not unsent:
                    # Every needed frame is in the decoder: drain it rather than demuxing and
                    # decoding the frames after the run.  (The next seek flushes the decoder.)
                    ctx.skip_frame = "DEFAULT"
                    if take(ctx.decode(None)) is None:
                        return False
                    break
    except Exception as e:
        raise VideoDecodeError(f"{info.path}: decoding failed ({type(e).__name__}: {e})") from e
    finally:
        ctx.skip_frame = "DEFAULT"
    return True


def _read_frame_folder(info: VideoInfo, indices: Sequence[int]) -> np.ndarray:
    from PIL import Image

    cache: dict[int, np.ndarray] = {}
    out: list[np.ndarray] = []
    for i in indices:
        i = int(i)
        if i not in cache:
            p = os.path.join(info.path, info.frames[i])
            try:
                with Image.open(p) as im:
                    cache[i] = np.asarray(im.convert("RGB"))
            except Exception as e:
                raise VideoDecodeError(f"{p}: cannot read frame ({e})") from e
            if cache[i].shape[:2] != (info.height, info.width):
                raise VideoDecodeError(
                    f"{p}: frame is {cache[i].shape[1]}x{cache[i].shape[0]}, expected "
                    f"{info.width}x{info.height} like the folder's first frame"
                )
        out.append(cache[i])
    return np.stack(out)


def is_video_path(path: str | Path) -> bool:
    return str(path).lower().endswith(VIDEO_EXTENSIONS)
