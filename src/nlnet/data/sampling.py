"""Which frames make a clip (§4.1 training, §4.2 testing; the original code's rules, §5.6).

A clip is ``clip_length`` frames taken every ``sampling_rate`` frames: 32×2 in the paper (64
consecutive frames, every other one dropped), 8×8, 128×1, 32×4 ...  Indices wrap modulo the
number of frames ``N``, so a video shorter than the clip's span loops (original code).
"""

from __future__ import annotations

import torch


def _check(num_frames: int, clip_length: int, sampling_rate: int) -> None:
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got num_frames={num_frames}")
    if clip_length < 1 or sampling_rate < 1:
        raise ValueError(
            f"clip_length and sampling_rate must be >= 1, got {clip_length} and {sampling_rate}"
        )


def clip_indices(start: int, num_frames: int, clip_length: int, sampling_rate: int) -> list[int]:
    """Frames ``start + j * sampling_rate`` (j < clip_length), modulo ``num_frames``."""
    _check(num_frames, clip_length, sampling_rate)
    return [(start + j * sampling_rate) % num_frames for j in range(clip_length)]


def train_clip_start(
    num_frames: int,
    clip_length: int,
    sampling_rate: int,
    generator: torch.Generator | None = None,
) -> int:
    """Training start frame: uniform over ``[0, N - clip_length * sampling_rate]`` (0 if negative).

    [P] §4.1: "cropping 64 consecutive frames" at random; the original code draws the start
    uniformly over ``[0, N - 64]`` and wraps indices when the video is shorter.
    """
    _check(num_frames, clip_length, sampling_rate)
    max_start = max(num_frames - clip_length * sampling_rate, 0)
    return int(torch.randint(max_start + 1, (1,), generator=generator))


def train_clip_indices(
    num_frames: int,
    clip_length: int,
    sampling_rate: int,
    generator: torch.Generator | None = None,
) -> list[int]:
    """One random training clip (see :func:`train_clip_start`)."""
    start = train_clip_start(num_frames, clip_length, sampling_rate, generator)
    return clip_indices(start, num_frames, clip_length, sampling_rate)


def evenly_spaced_clip_start(num_frames: int, num_clips: int, clip: int) -> int:
    """Start of test clip ``clip`` of ``num_clips`` evenly spaced ones: ``floor(k * N / K)`` (§4.2)."""
    if not 0 <= clip < num_clips:
        raise ValueError(f"clip index {clip} outside [0, {num_clips})")
    return (clip * num_frames) // num_clips


def evenly_spaced_clip_indices(
    num_frames: int, clip_length: int, sampling_rate: int, num_clips: int, clip: int
) -> list[int]:
    """Frames of test clip ``clip`` (§4.2: K clips evenly spaced in time, indices wrap)."""
    start = evenly_spaced_clip_start(num_frames, num_clips, clip)
    return clip_indices(start, num_frames, clip_length, sampling_rate)
