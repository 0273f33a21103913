"""Clip transforms (§4.1 spatial augmentation, §4.2 test views, §4.3 Charades sizes).

Every transform acts on a whole clip with *one* random draw, so all frames of a clip get the same
scale, crop and flip.  Input clips are ``(T, H, W, 3)`` uint8 RGB frames as decoded; outputs are
normalised ``(C, T, H, W)`` float tensors, the layout of the video models.

Resizing is bilinear without antialiasing (``F.interpolate(mode="bilinear",
align_corners=False)``; the original code used OpenCV's default bilinear ``cv2.resize``, on
uint8 frames, as we do); the output keeps the aspect ratio, with the longer side rounded to the
nearest integer.  :func:`resized_crop` does resize, crop and flip in one go and converts only the
cropped pixels to float.  The plain float helpers (:func:`to_float_clip`, :func:`resize`,
:func:`crop`, :func:`hflip`) spell out the same steps and serve as the reference in tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# The original code's single mean/std for all channels, 0.45·255 and 0.225·255 (§4.1), on RGB.
ORIGINAL_MEAN_STD = ((114.75, 114.75, 114.75), (57.375, 57.375, 57.375))
IMAGENET_MEAN_STD = (
    (0.485 * 255, 0.456 * 255, 0.406 * 255),
    (0.229 * 255, 0.224 * 255, 0.225 * 255),
)
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "original": ORIGINAL_MEAN_STD,
    "imagenet": IMAGENET_MEAN_STD,
}
TEST_CROPS = ("three", "full", "center")


def to_float_clip(frames: np.ndarray | Tensor) -> Tensor:
    """``(T, H, W, 3)`` uint8 RGB frames → ``(T, 3, H, W)`` float32 in [0, 255]."""
    t = torch.as_tensor(frames)
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected (T, H, W, 3) frames, got shape {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).float()


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(H, W) after rescaling the shorter side to ``size``, keeping the aspect ratio."""
    if height <= width:
        return size, max(size, int(width * size / height + 0.5))
    return max(size, int(height * size / width + 0.5)), size


def resize(clip: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of a ``(T, C, H, W)`` clip to ``size`` = (H, W)."""
    if tuple(clip.shape[-2:]) == tuple(size):
        return clip
    return F.interpolate(clip, size=size, mode="bilinear", align_corners=False, antialias=False)


def resize_short_side(clip: Tensor, size: int) -> Tensor:
    return resize(clip, short_side_size(clip.shape[-2], clip.shape[-1], size))


def resized_crop(
    frames: np.ndarray | Tensor,
    size: tuple[int, int],
    top: int,
    left: int,
    height: int,
    width: int,
    flip: bool = False,
) -> Tensor:
    """``(T, H, W, 3)`` frames → ``(3, T, height, width)`` float: the frames bilinearly resized
    to ``size`` = (H', W'), cropped to ``(top, left, height, width)`` and optionally mirrored.

    uint8 frames are resized in uint8 (PyTorch's vectorised channels-last kernel, several times
    faster than on floats), i.e. rounded to integers like the original code's OpenCV resize;
    only the cropped pixels are then converted to float.
    """
    t = torch.as_tensor(frames)
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected (T, H, W, 3) frames, got shape {tuple(t.shape)}")
    out_h, out_w = size
    if top < 0 or left < 0 or top + height > out_h or left + width > out_w:
        raise ValueError(f"crop ({top}, {left}, {height}, {width}) outside a {size} frame")
    x = t.permute(0, 3, 1, 2)  # (T, 3, H, W) in channels-last memory layout
    if tuple(x.shape[-2:]) != (out_h, out_w):
        x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False)
    x = x[..., top : top + height, left : left + width]
    if flip:
        x = x.flip(-1)
    out = torch.empty((3, x.shape[0], height, width), dtype=torch.float32)
    out.copy_(x.permute(1, 0, 2, 3))  # one pass: to float and to (C, T, H, W)
    return out


def crop(clip: Tensor, top: int, left: int, height: int, width: int) -> Tensor:
    if top < 0 or left < 0 or top + height > clip.shape[-2] or left + width > clip.shape[-1]:
        raise ValueError(
            f"crop ({top}, {left}, {height}, {width}) outside a {tuple(clip.shape[-2:])} frame"
        )
    return clip[..., top : top + height, left : left + width]


def random_crop_box(
    height: int, width: int, size: int, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """Top-left corner of a uniformly random ``size``×``size`` crop."""
    if size > height or size > width:
        raise ValueError(f"crop size {size} larger than the frame ({height}x{width})")
    top = int(torch.randint(height - size + 1, (1,), generator=generator))
    left = int(torch.randint(width - size + 1, (1,), generator=generator))
    return top, left


def three_crop_boxes(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """Three ``size`` crops covering the longer side: at its start, centre and end (§4.2, code).

    Along the shorter side the crops are centred.
    """
    if size > height or size > width:
        raise ValueError(f"crop size {size} larger than the frame ({height}x{width})")
    if width >= height:
        top = (height - size) // 2
        return [(top, 0), (top, (width - size) // 2), (top, width - size)]
    left = (width - size) // 2
    return [(0, left), ((height - size) // 2, left), (height - size, left)]


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    return three_crop_boxes(height, width, size)[1]


def hflip(clip: Tensor) -> Tensor:
    return clip.flip(-1)


def normalize(clip: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per channel of a ``(C, T, H, W)`` clip, in place."""
    m = torch.tensor(mean, dtype=clip.dtype).view(-1, 1, 1, 1)
    s = torch.tensor(std, dtype=clip.dtype).view(-1, 1, 1, 1)
    return clip.sub_(m).div_(s)


def mean_std(normalization: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {sorted(NORMALIZATIONS)}, got {normalization!r}"
        )
    return NORMALIZATIONS[normalization]


def train_transform(
    frames: np.ndarray | Tensor,
    *,
    jitter: tuple[int, int] = (256, 320),
    crop_size: int = 224,
    resize_to: int | None = None,
    normalization: str = "original",
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """§4.1: shorter side to a random integer in ``jitter`` (inclusive), random ``crop_size``
    crop, horizontal flip with p = 0.5 — one draw for the whole clip (draw order: scale, top,
    left, flip).

    ``resize_to`` (Charades, §4.3: "the video is rescaled so that this window becomes 288×288"):
    the jittered scale is multiplied by ``resize_to / crop_size`` and a ``resize_to`` crop taken,
    i.e. the ``crop_size`` window of the jittered video, rescaled to ``resize_to``, in a single
    interpolation.
    """
    mean, std = mean_std(normalization)
    lo, hi = int(jitter[0]), int(jitter[1])
    if lo > hi or lo < crop_size:
        raise ValueError(f"jitter {jitter} must be an increasing range with min >= {crop_size}")
    scale = int(torch.randint(lo, hi + 1, (1,), generator=generator))
    size = crop_size
    if resize_to is not None and resize_to != crop_size:
        scale = int(scale * resize_to / crop_size + 0.5)
        size = resize_to
    frames_t = torch.as_tensor(frames)
    if frames_t.ndim != 4 or frames_t.shape[-1] != 3:
        raise ValueError(f"expected (T, H, W, 3) frames, got shape {tuple(frames_t.shape)}")
    scaled = short_side_size(frames_t.shape[1], frames_t.shape[2], scale)
    top, left = random_crop_box(scaled[0], scaled[1], size, generator)
    mirror = flip and bool(torch.rand((1,), generator=generator) < 0.5)
    clip = resized_crop(frames_t, scaled, top, left, size, size, flip=mirror)
    return normalize(clip, mean, std)


def num_eval_views(test_crop: str) -> int:
    """Spatial views per temporal clip for a ``test_crop`` mode."""
    if test_crop not in TEST_CROPS:
        raise ValueError(f"test_crop must be one of {TEST_CROPS}, got {test_crop!r}")
    return 3 if test_crop == "three" else 1


def eval_transform(
    frames: np.ndarray | Tensor,
    *,
    scale: int = 256,
    test_crop: str = "three",
    view: int = 0,
    crop_size: int | None = None,
    normalization: str = "original",
) -> Tensor:
    """§4.2: shorter side to ``scale``, then spatial view ``view`` of ``test_crop``:

    * ``"three"``: crop ``view`` ∈ {0, 1, 2} of three ``crop_size`` crops along the longer side
      (the original code; ``crop_size`` defaults to ``scale``, i.e. 256×256);
    * ``"full"``: the whole frame (the paper's fully-convolutional test);
    * ``"center"``: one centred ``crop_size`` crop.
    """
    mean, std = mean_std(normalization)
    views = num_eval_views(test_crop)
    if not 0 <= view < views:
        raise ValueError(f"view {view} outside [0, {views}) for test_crop={test_crop!r}")
    frames_t = torch.as_tensor(frames)
    if frames_t.ndim != 4 or frames_t.shape[-1] != 3:
        raise ValueError(f"expected (T, H, W, 3) frames, got shape {tuple(frames_t.shape)}")
    h, w = short_side_size(frames_t.shape[1], frames_t.shape[2], scale)
    top, left, ch, cw = 0, 0, h, w
    if test_crop != "full":
        ch = cw = scale if crop_size is None else crop_size
        boxes = three_crop_boxes(h, w, ch)
        top, left = boxes[view] if test_crop == "three" else boxes[1]
    return normalize(resized_crop(frames_t, (h, w), top, left, ch, cw), mean, std)
