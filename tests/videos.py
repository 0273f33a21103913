"""Tiny test videos and frame folders whose pixels say which frame they are.

``make_video(path, num_frames, fps, size)`` writes an H.264 (or MPEG-4) file with PyAV;
``make_frame_folder(folder, num_frames, size)`` writes JPEG frames like Charades'
``<id>/<id>-000000.jpg``.  With ``pattern="index"`` frame ``i`` is grey with the top half at level
``20 + 8 * (i % 25)`` and the bottom half at ``20 + 8 * (i // 25)``, so :func:`frame_index`
recovers ``i`` (up to 625 frames) from a decoded, resized or cropped frame despite lossy coding;
a thin band across the middle (rows 7/16..9/16) is a left-to-right ramp 0..255, so crops and
flips are visible (:func:`band_profile`).
``pattern="texture"`` draws a moving textured scene (realistic decoding cost, for benchmarks).

Other tests reuse these helpers: ``from videos import make_video`` (``tests/`` is on ``sys.path``
under pytest's default rootdir-based import mode).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

STEP = 8
BASE = 20
PER_HALF = 25


def index_levels(i: int) -> tuple[int, int]:
    """(top, bottom) grey levels of frame ``i`` in the ``"index"`` pattern."""
    if not 0 <= i < PER_HALF * PER_HALF:
        raise ValueError(f"the index pattern encodes frames 0..{PER_HALF**2 - 1}, got {i}")
    return BASE + STEP * (i % PER_HALF), BASE + STEP * (i // PER_HALF)


def frame_array(i: int, size: tuple[int, int] = (64, 48), pattern: str = "index") -> np.ndarray:
    """Frame ``i`` as an (H, W, 3) uint8 RGB array; ``size`` is (width, height)."""
    w, h = size
    if pattern == "index":
        top, bottom = index_levels(i)
        a = np.empty((h, w, 3), np.uint8)
        a[: h // 2] = top
        a[h // 2 :] = bottom
        a[7 * h // 16 : 9 * h // 16] = np.linspace(0, 255, w).round().astype(np.uint8)[:, None]
        return a
    if pattern == "texture":
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        r = 127 + 100 * np.sin((x + 3 * i) / 7.0) * np.cos((y - 2 * i) / 11.0)
        g = 127 + 100 * np.sin((x * 0.7 + y * 0.3 + 5 * i) / 5.0)
        b = 127 + 100 * np.cos((y + i) / 9.0)
        noise = np.random.default_rng(i).integers(0, 24, (h, w), dtype=np.int64)
        return np.clip(np.stack([r, g, b], -1) + noise[..., None], 0, 255).astype(np.uint8)
    raise ValueError(f"unknown pattern {pattern!r}; expected 'index' or 'texture'")


def frame_index(frame: np.ndarray) -> int:
    """Inverse of the ``"index"`` pattern for an (H, W, 3) or (3, H, W) frame in [0, 255]."""
    a = np.asarray(frame, dtype=np.float64)
    if a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    h = a.shape[0]
    top = np.median(a[: max(1, h // 4)])
    bottom = np.median(a[h - max(1, h // 4) :])
    lo = round((top - BASE) / STEP)
    hi = round((bottom - BASE) / STEP)
    return int(hi * PER_HALF + lo)


def band_profile(frame: np.ndarray) -> np.ndarray:
    """Mean along the width of the ramp band's rows (the rows that vary from left to right,
    found wherever a crop put them): rises left to right unless the frame is flipped."""
    a = np.asarray(frame, dtype=np.float64)
    if a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    a = a.mean(axis=2)
    spread = a.max(axis=1) - a.min(axis=1)
    rows = spread > 0.8 * spread.max()
    return a[rows].mean(axis=0)


def make_video(
    path: str | Path,
    num_frames: int,
    fps: float = 25,
    size: tuple[int, int] = (64, 48),
    codec: str = "h264",
    pattern: str = "index",
    *,
    times: list[float] | None = None,
    gop: int | None = None,
    crf: int = 18,
) -> Path:
    """Write a video of ``num_frames`` frames; ``times`` (seconds) makes it variable-frame-rate.

    ``codec``: ``"h264"`` (libx264) or ``"mpeg4"``.  ``gop``: key-frame interval (None = the
    encoder's default, 250 for libx264, like ffmpeg's command line).
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    encoder = {"h264": "libx264", "mpeg4": "mpeg4"}[codec]
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=rate)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if codec == "h264":
            stream.options = {"crf": str(crf)}
        else:
            stream.bit_rate = 4_000_000  # near-lossless: the index pattern must survive
        if gop is not None:
            stream.codec_context.gop_size = gop
        if times is not None:
            if len(times) != num_frames:
                raise ValueError("times needs one timestamp per frame")
            tb = Fraction(1, 1000)
            stream.codec_context.time_base = tb
            stream.time_base = tb
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_array(i, size, pattern), format="rgb24")
            if times is not None:
                frame.pts = round(times[i] * 1000)
                frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_frame_folder(
    folder: str | Path,
    num_frames: int,
    size: tuple[int, int] = (64, 48),
    pattern: str = "index",
    *,
    video_id: str | None = None,
    first: int = 0,
    quality: int = 95,
) -> Path:
    """JPEG frames ``<folder>/<id>-000000.jpg`` … (Charades' layout; ``id`` = folder name)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vid = video_id or folder.name
    for i in range(num_frames):
        Image.fromarray(frame_array(i, size, pattern)).save(
            folder / f"{vid}-{first + i:06d}.jpg", quality=quality
        )
    return folder


def truncate(path: str | Path, fraction: float = 0.5) -> Path:
    """Cut a file to ``fraction`` of its bytes (a broken download)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path
