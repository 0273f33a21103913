"""Clip sampling, transforms and decoding (§4.1–4.2) on tiny generated videos."""

from __future__ import annotations

import bisect

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nlnet.data.sampling import (
    clip_indices,
    evenly_spaced_clip_indices,
    evenly_spaced_clip_start,
    train_clip_indices,
    train_clip_start,
)
from nlnet.data.transforms import (
    IMAGENET_MEAN_STD,
    eval_transform,
    resized_crop,
    short_side_size,
    three_crop_boxes,
    train_transform,
)
from nlnet.data.video import (
    VideoDecodeError,
    _pts_from_demux,
    _pts_from_index,
    decode_all_frames,
    decode_frames,
    probe_video,
)
from videos import frame_index, make_frame_folder, make_video, truncate

# Clip-sized tensor ops are small: intra-op threads only add synchronisation.
pytestmark = pytest.mark.usefixtures("one_thread")


# -- sampling -----------------------------------------------------------------------------------


def test_train_start_is_uniform_over_valid_range():
    g = torch.Generator().manual_seed(0)
    starts = [train_clip_start(100, 8, 2, g) for _ in range(2000)]
    assert min(starts) == 0 and max(starts) == 100 - 16  # [0, N - L*s] inclusive
    counts = np.bincount(starts, minlength=85)
    assert counts.min() > 5  # every start reachable (expected ~23.5 each)
    idx = train_clip_indices(100, 8, 2, torch.Generator().manual_seed(3))
    s = idx[0]
    assert idx == [s + 2 * j for j in range(8)]


def test_short_video_wraps_around():
    # span 16 > 10 frames: start 0, indices modulo N (original code)
    g = torch.Generator().manual_seed(0)
    assert {train_clip_start(10, 8, 2, g) for _ in range(50)} == {0}
    assert train_clip_indices(10, 8, 2, g) == [0, 2, 4, 6, 8, 0, 2, 4]
    assert clip_indices(7, 9, 4, 3) == [7, 1, 4, 7]


def test_evenly_spaced_test_clips():
    assert [evenly_spaced_clip_start(100, 10, k) for k in range(10)] == list(range(0, 100, 10))
    assert [evenly_spaced_clip_start(7, 10, k) for k in range(10)] == [
        (k * 7) // 10 for k in range(10)
    ]
    assert evenly_spaced_clip_indices(100, 8, 2, 10, 9) == [(90 + 2 * j) % 100 for j in range(8)]
    with pytest.raises(ValueError, match="clip index"):
        evenly_spaced_clip_start(100, 10, 10)
    with pytest.raises(ValueError, match="at least one frame"):
        clip_indices(0, 0, 8, 2)


# -- transforms ---------------------------------------------------------------------------------


def _reference_resized_crop(frames, size, top, left, h, w, flip):
    x = torch.as_tensor(frames).permute(0, 3, 1, 2).double()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    x = x[..., top : top + h, left : left + w]
    if flip:
        x = x.flip(-1)
    return x.permute(1, 0, 2, 3)


@pytest.mark.parametrize(
    "size,box,flip",
    [
        ((60, 86), (3, 7, 40, 50), False),
        ((37, 53), (0, 0, 37, 53), True),
        ((20, 29), (1, 2, 15, 20), True),
    ],
)
def test_resized_crop_matches_interpolate_then_crop(size, box, flip):
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (3, 37, 53, 3), dtype=torch.uint8, generator=g)
    ref = _reference_resized_crop(frames, size, *box, flip)
    out = resized_crop(frames, size, *box, flip=flip).double()
    # uint8 frames are resized in uint8 (rounded, like OpenCV in the original code)
    assert (out - ref).abs().max() <= 1.0 + 1e-6
    assert (out - ref).abs().mean() < 0.35  # rounding alone gives 0.25
    # float frames take the float path: exact up to float32 rounding
    out_f = resized_crop(frames.float(), size, *box, flip=flip).double()
    assert torch.allclose(out_f, ref, atol=1e-3)


def test_train_transform_one_draw_for_the_whole_clip():
    """Frame t = base image + t: after the transform every frame must differ from frame 0 by
    exactly t, which holds only if all frames got the same scale, crop and flip."""
    g = torch.Generator().manual_seed(2)
    base = torch.rand(1, 48, 64, 3, generator=g, dtype=torch.float64) * 200
    frames = (base + torch.arange(6, dtype=torch.float64).view(6, 1, 1, 1)).float()
    flips = set()
    # small sizes keep this fast; the code path is the one of (256, 320) / 224
    for seed in range(6):
        clip = train_transform(
            frames, jitter=(64, 80), crop_size=56, generator=torch.Generator().manual_seed(seed)
        )
        assert clip.shape == (3, 6, 56, 56)
        raw = clip * 57.375 + 114.75
        for t in range(6):
            assert torch.allclose(raw[:, t] - raw[:, 0], torch.full_like(raw[:, 0], t), atol=2e-3)
        # the same output as a reference fed the same draws (scale, top, left, flip)
        r = torch.Generator().manual_seed(seed)
        scale = int(torch.randint(64, 81, (1,), generator=r))
        h, w = short_side_size(48, 64, scale)
        top = int(torch.randint(h - 56 + 1, (1,), generator=r))
        left = int(torch.randint(w - 56 + 1, (1,), generator=r))
        flip = bool(torch.rand((1,), generator=r) < 0.5)
        flips.add(flip)
        ref = _reference_resized_crop(frames, (h, w), top, left, 56, 56, flip)
        assert torch.allclose(raw.double(), ref, atol=2e-3)
    assert flips == {True, False}


def test_charades_resize_to_rescales_the_crop_window():
    frames = torch.rand(2, 48, 64, 3, generator=torch.Generator().manual_seed(0)) * 255
    clip = train_transform(frames, crop_size=224, resize_to=288, generator=torch.Generator())
    assert clip.shape == (3, 2, 288, 288)


def test_eval_views_and_normalization():
    g = torch.Generator().manual_seed(4)
    frames = torch.randint(0, 256, (2, 48, 64, 3), dtype=torch.uint8, generator=g).float()
    h, w = short_side_size(48, 64, 256)
    assert (h, w) == (256, 341)
    boxes = three_crop_boxes(h, w, 256)
    assert boxes == [(0, 0), (0, 42), (0, 85)]
    for view, (top, left) in enumerate(boxes):
        out = eval_transform(frames, scale=256, test_crop="three", view=view)
        ref = _reference_resized_crop(frames, (h, w), top, left, 256, 256, False)
        assert torch.allclose(out.double() * 57.375 + 114.75, ref, atol=2e-3)
    full = eval_transform(frames, scale=256, test_crop="full")
    assert full.shape == (3, 2, 256, 341)
    center = eval_transform(frames, scale=256, test_crop="center", crop_size=224)
    ref = _reference_resized_crop(frames, (h, w), 16, 58, 224, 224, False)
    assert torch.allclose(center.double() * 57.375 + 114.75, ref, atol=2e-3)
    # portrait frames: crops run along the height
    assert three_crop_boxes(341, 256, 256) == [(0, 0), (42, 0), (85, 0)]
    # ImageNet normalisation per channel
    const = torch.full((1, 8, 8, 3), 100.0)
    out = eval_transform(const, scale=8, test_crop="full", normalization="imagenet")
    mean, std = IMAGENET_MEAN_STD
    for c in range(3):
        assert torch.allclose(out[c], torch.full_like(out[c], (100 - mean[c]) / std[c]))
    with pytest.raises(ValueError, match="normalization"):
        eval_transform(const, normalization="bgr")
    with pytest.raises(ValueError, match="test_crop"):
        eval_transform(const, test_crop="five")


# -- decoding -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {
        "gop12": make_video(d / "gop12.mp4", 60, fps=25, gop=12),
        "default": make_video(d / "default.mp4", 60, fps=30),
        "mpeg4": make_video(d / "mpeg4.avi", 30, fps=25, codec="mpeg4", gop=10),
        "dir": d,
    }


@pytest.mark.parametrize("name", ["gop12", "default", "mpeg4"])
def test_decode_frames_equals_decoding_everything(videos, name):
    path = videos[name]
    info = probe_video(path)
    every = decode_all_frames(path)
    assert info.num_frames == len(every)
    assert [frame_index(f) for f in every] == list(range(len(every)))
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        idx = torch.randint(info.num_frames, (8,), generator=g).tolist()
        got = decode_frames(info, idx)
        assert np.array_equal(got, every[idx])
        assert [frame_index(f) for f in got] == idx
    assert np.array_equal(decode_frames(info, idx, threads=2), every[idx])  # FFmpeg threads
    # a wrapped clip: end and start of the video
    idx = clip_indices(info.num_frames - 5, info.num_frames, 6, 2)
    assert [frame_index(f) for f in decode_frames(info, idx)] == idx


@pytest.mark.parametrize("name", ["gop12", "default", "mpeg4"])
def test_index_timestamps_equal_demuxed_ones(videos, name):
    # constant-rate files are probed from the container index; it must agree with the packets
    with av.open(str(videos[name])) as c:
        stream = c.streams.video[0]
        from_index = _pts_from_index(stream)
        from_packets = _pts_from_demux(c, stream, str(videos[name]))
    assert from_index is not None and from_index == from_packets


def test_variable_frame_rate_by_timestamps(videos):
    # gaps of 40 ms and 100 ms: frame numbers follow presentation order, times come from pts
    times = [0.0]
    for i in range(39):
        times.append(times[-1] + (0.1 if i % 3 == 0 else 0.04))
    path = make_video(videos["dir"] / "vfr.mp4", 40, times=times)
    with av.open(str(path)) as c:
        assert _pts_from_index(c.streams.video[0]) is None  # uneven: read from the packets
    info = probe_video(path)
    assert info.num_frames == 40
    assert np.allclose(info.times, times, atol=1e-3)
    idx = [0, 1, 2, 17, 39]
    assert [frame_index(f) for f in decode_frames(info, idx)] == idx
    # at a fixed 10 fps, frame j is the native frame on screen at t = j / 10
    n = info.num_frames_at(10)
    assert n == int(info.duration * 10 + 1e-6)
    for j in range(n):
        expect = bisect.bisect_right(times, j / 10 + 1e-9) - 1
        assert info.native_index(j, 10) == expect
    natives = [info.native_index(j, 10) for j in range(n)]
    assert [frame_index(f) for f in decode_frames(info, natives)] == natives


def test_frame_folder(tmp_path):
    folder = make_frame_folder(tmp_path / "ABCDE", 30)
    assert (folder / "ABCDE-000000.jpg").exists()
    info = probe_video(folder, frame_rate=24)
    assert (info.num_frames, info.fps, info.width, info.height) == (30, 24, 64, 48)
    assert info.frame_time(12, None) == pytest.approx(0.5)
    idx = [29, 0, 3, 3]
    assert [frame_index(f) for f in decode_frames(info, idx)] == idx


def test_broken_files_raise_clear_errors(tmp_path, videos):
    zero = tmp_path / "zero.mp4"
    zero.write_bytes(b"")
    text = tmp_path / "text.mp4"
    text.write_text("not a video")
    cut = truncate(make_video(tmp_path / "cut.mp4", 40), 0.5)
    for path, why in [
        (tmp_path / "absent.mp4", "no such file"),
        (zero, "empty file"),
        (text, "cannot open"),
        (cut, str(cut)),
        (tmp_path, "no .jpg"),
    ]:
        with pytest.raises(VideoDecodeError, match=why):
            probe_video(path)
    info = probe_video(videos["gop12"])
    with pytest.raises(IndexError, match="outside"):
        decode_frames(info, [60])
