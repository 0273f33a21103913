"""Exactness of the clip decoder (nlnet.data.video.decode_frames) against decoding every frame.

The fast path (one seek to the key frame before a run of needed frames, unreferenced frames
skipped by the codec, the decoder drained after the last needed frame, one RGB converter per
clip) must give, pixel for pixel, what decoding every frame with ``frame.to_ndarray("rgb24")``
and picking gives (:func:`decode_all_frames`, the original code's way).  The videos use the
textured pattern (lossy, with x264's B-frame pyramid and reference B-frames), so any frame
decoded from the wrong references or converted differently shows up.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nlnet.data.sampling import clip_indices
from nlnet.data.video import decode_all_frames, decode_frames, probe_video
from videos import make_video

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    d = tmp_path_factory.mktemp("textured")
    size = (96, 64)
    times = [0.0]
    for i in range(89):
        times.append(times[-1] + (0.1 if i % 3 == 0 else 0.04))
    return {
        # x264's default key-frame interval (250) > the video: one key frame, B-pyramid
        "x264 default gop": make_video(d / "g250.mp4", 160, 30, size, pattern="texture", crf=23),
        "gop 30": make_video(d / "g30.mp4", 160, 30, size, pattern="texture", crf=23, gop=30),
        "gop 12, 25 fps": make_video(d / "g12.mp4", 120, 25, size, pattern="texture", gop=12),
        "24000/1001 fps": make_video(d / "ntsc.mp4", 100, 24000 / 1001, size, pattern="texture"),
        "mpeg4": make_video(d / "m4.avi", 80, 24, size, "mpeg4", pattern="texture", gop=10),
        "vfr": make_video(d / "vfr.mp4", 90, size=size, pattern="texture", times=times),
    }


@pytest.fixture(scope="module")
def every(textured):
    return {name: decode_all_frames(path) for name, path in textured.items()}


NAMES = ["x264 default gop", "gop 30", "gop 12, 25 fps", "24000/1001 fps", "mpeg4", "vfr"]


@pytest.mark.parametrize("name", NAMES)
def test_training_clips_equal_decoding_every_frame(textured, every, name):
    info = probe_video(textured[name])
    ref = every[name]
    n = info.num_frames
    assert n == len(ref)
    # every start (clips near the end wrap around to the start), several clip shapes
    for length, rate, step in ((32, 2, 5), (8, 8, 9), (16, 1, 13), (4, 4, 17)):
        for start in range(0, n, step):
            idx = clip_indices(start, n, length, rate)
            got = decode_frames(info, idx)
            assert got.shape == (length, *ref.shape[1:])
            assert np.array_equal(got, ref[idx]), (name, length, rate, start)


@pytest.mark.parametrize("name", NAMES)
def test_scattered_frames_and_seeks_after_a_drained_run(textured, every, name):
    info = probe_video(textured[name])
    ref = every[name]
    n = info.num_frames
    last = n - 1
    cases = [
        [0],
        [last],
        [last, 0, last - 1, 1],  # both ends: two runs, any order, repeats
        [3, 3, 3],
        [0, 5, last - 2, last],  # a run, a drained decoder, a seek far ahead
        [last - 3, 2],  # far frame first
        list(range(n)),  # every frame through the fast path
    ]
    g = torch.Generator().manual_seed(n)
    cases += [torch.randint(n, (12,), generator=g).tolist() for _ in range(4)]
    for idx in cases:
        assert np.array_equal(decode_frames(info, idx), ref[idx]), (name, idx)


@pytest.mark.parametrize("name", ["x264 default gop", "gop 12, 25 fps", "vfr"])
def test_decoder_threads_give_the_same_frames(textured, every, name):
    info = probe_video(textured[name])
    n = info.num_frames
    for start in (0, n // 3, n - 20):
        idx = clip_indices(start, n, 16, 2)
        for threads in (2, 3):
            assert np.array_equal(decode_frames(info, idx, threads=threads), every[name][idx])


def test_fixed_target_rate_reads_the_same_frames(textured, every):
    # at a fixed rate the native frames picked by time go through the same decoder
    info = probe_video(textured["vfr"])
    for fps in (10.0, 30.0):
        n = info.num_frames_at(fps)
        natives = [info.native_index(j, fps) for j in clip_indices(n - 7, n, 16, 2)]
        assert np.array_equal(decode_frames(info, natives), every["vfr"][natives])


def test_dataset_items_equal_the_every_frame_pipeline(tmp_path):
    # The whole training item (start draw, decode, scale jitter, crop, flip, normalisation) from a
    # seed is the same as decoding every frame, picking the clip and transforming it.
    from nlnet.data import build_dataset
    from nlnet.data.sampling import train_clip_start
    from nlnet.data.transforms import train_transform

    make_video(tmp_path / "a" / "v.mp4", 90, 30, (96, 64), pattern="texture", crf=23)
    ds = build_dataset(
        "folder", root=tmp_path, mode="train", clip_length=8, sampling_rate=4,
        crop_size=48, jitter=(64, 80),
    )  # fmt: skip
    every = decode_all_frames(tmp_path / "a" / "v.mp4")
    for seed in range(6):
        item = ds[(0, seed)]
        g = torch.Generator().manual_seed(seed)
        start = train_clip_start(len(every), 8, 4, g)
        idx = clip_indices(start, len(every), 8, 4)
        want = train_transform(every[idx], jitter=(64, 80), crop_size=48, generator=g)
        assert torch.equal(item["clip"], want), seed
