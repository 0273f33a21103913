"""An embedded synthetic video task that only a non-local network can solve: "colour match".

Why it exists (§1, §5 of the paper): a non-local block relates positions far apart in space
*and time* in one step, which per-frame convolutions followed by an averaging head cannot do.
This task makes that claim measurable on a laptop CPU in minutes, with no download.

The task
--------
A clip has ``clip_length`` (T, default 8) frames of ``crop_size × crop_size`` (32) RGB pixels on
a black background.  Square A (``square × square``, 5 px) appears in exactly one frame among
``first_frames`` (frames 0–2), square B in exactly one frame among ``second_frames`` (the last
three), both at uniformly random places, each filled with one colour of a palette of
``num_colours`` (8).  The label is **1 when A and B have the same colour**, else 0.  Labels are
balanced by construction (item ``i`` has label ``i % 2``) and, inside each class, each square's
colour is uniform over the palette: a single square carries no information about the label.

Why C2D with an averaging head cannot solve it
----------------------------------------------
A C2D network convolves each frame on its own (1×k×k kernels), so A and B, being in different
frames, never share a receptive field.  The global average pool then sums per-position
features, and the head is linear, so the logit is additive over the two objects:
``logit = k + s(A) + s(B)`` (s depends on a square's colour and place, k on the background).
No additive score separates the classes: "same" needs ``2·s(c) > b`` for every colour c while
"different" needs ``s(c) + s(d) < b`` for c ≠ d, and adding the first for c and d contradicts
the second.  The best an additive rule can do is answer "same" only when both colours fall in a
chosen half of the palette: with 8 colours that is 0.5·4/8 + 0.5·(1 − 12/56) = 64.3 % accuracy,
so a C2D baseline stays ≤ 0.65 by construction (trained ones sit near chance, 0.5).  One
non-local block lets a query at A read B's features directly (Eq. 1), which solves the task.

Item contract: see :mod:`nlnet.data.registry`.  ``dataset[i]`` is a fixed clip for each ``i``
(derived from ``seed``); in ``train`` mode ``dataset[(i, draw_seed)]`` draws a fresh clip
from ``torch.Generator().manual_seed(draw_seed)`` (label still ``i % 2``), so a training run sees
new clips every step; in ``val``/``test`` the set is fixed and ``draw_seed`` is ignored.
:meth:`ColourMatchDataset.describe` returns where the squares are (used to pick on-object queries
for the attention figure).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from nlnet.data.registry import register_dataset
from nlnet.seeds import derive_seed

# Eight saturated, easily told apart colours (RGB in [0, 1]).
PALETTE: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0),  # red
    (0.0, 1.0, 0.0),  # green
    (0.0, 0.3, 1.0),  # blue
    (1.0, 1.0, 0.0),  # yellow
    (1.0, 0.0, 1.0),  # magenta
    (0.0, 1.0, 1.0),  # cyan
    (1.0, 1.0, 1.0),  # white
    (1.0, 0.5, 0.0),  # orange
)
COLOUR_NAMES: tuple[str, ...] = (
    "red",
    "green",
    "blue",
    "yellow",
    "magenta",
    "cyan",
    "white",
    "orange",
)
SPLITS: tuple[str, ...] = ("train", "val", "test")
IGNORED_VIDEO_OPTIONS = frozenset(
    {
        "sampling_rate",
        "jitter",
        "test_scale",
        "normalization",
        "max_retries",
        "target_fps",
        "missing_report",
        "num_clips",
        "test_crop",
        "root",
        "annotations",
        "classes",
    }
)

# Distinct seed streams per split, so val clips are not train clips with the same index.
_SPLIT_OFFSET = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class ClipSpec:
    """Where and what the two squares of one clip are (pixel coordinates of the top-left corner)."""

    frame_a: int
    frame_b: int
    top_left_a: tuple[int, int]
    top_left_b: tuple[int, int]
    colour_a: int
    colour_b: int
    square: int

    @property
    def label(self) -> int:
        return int(self.colour_a == self.colour_b)

    def centre(self, which: str) -> tuple[int, float, float]:
        """(frame, y, x) of square ``which`` ("a" or "b") centre, in pixels."""
        if which not in ("a", "b"):
            raise ValueError(f"which must be 'a' or 'b', got {which!r}")
        frame, (y, x) = (
            (self.frame_a, self.top_left_a) if which == "a" else (self.frame_b, self.top_left_b)
        )
        half = (self.square - 1) / 2
        return frame, y + half, x + half


@register_dataset("colour_match")
class ColourMatchDataset(Dataset):
    """The "colour match across time" task (module docstring); a registered dataset.

    Args:
        mode: ``"train"``, ``"val"`` or ``"test"`` (the split).
        num_samples: items in ``train`` mode: the length of one epoch of fresh draws.
        val_samples: items in ``val`` mode (and in ``test`` mode unless ``test_samples``): the
            fixed evaluation set.
        test_samples: items in ``test`` mode; default ``val_samples``.
        clip_length: T, frames per clip.
        crop_size: frame height and width in pixels.
        num_colours: palette size, 2–8.
        square: side of each square in pixels.
        first_frames: inclusive (lo, hi) range of frames where square A may appear.
        second_frames: inclusive range for square B; default the last three frames.
        seed: base seed of the fixed clips.
        mean, std: normalisation applied to pixel values in [0, 1].
        video_options: the video-decoding options the classification task passes to every data
            set (``sampling_rate``, ``jitter``, ``test_scale``, ``normalization``,
            ``max_retries``, ``target_fps``, ``missing_report``, ``num_clips``, ``test_crop``,
            ``root``, ``annotations``); generated clips have no use for them, so they are
            accepted and ignored.  Any other keyword is an error.
    """

    def __init__(
        self,
        mode: str = "train",
        *,
        num_samples: int = 10_000,
        val_samples: int = 2_000,
        test_samples: int | None = None,
        clip_length: int = 8,
        crop_size: int = 32,
        num_colours: int = 8,
        square: int = 5,
        first_frames: tuple[int, int] = (0, 2),
        second_frames: tuple[int, int] | None = None,
        seed: int = 0,
        mean: float = 0.5,
        std: float = 0.5,
        **video_options: Any,
    ) -> None:
        unknown = sorted(set(video_options) - IGNORED_VIDEO_OPTIONS)
        if unknown:
            raise TypeError(
                f"colour_match got unexpected keyword argument(s) {', '.join(unknown)}; it takes "
                "mode, num_samples, val_samples, test_samples, clip_length, crop_size, "
                "num_colours, square, first_frames, second_frames, seed, mean, std"
            )
        if mode not in SPLITS:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(SPLITS)}")
        if test_samples is None:
            test_samples = val_samples
        for name, value in (
            ("num_samples", num_samples),
            ("val_samples", val_samples),
            ("test_samples", test_samples),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        num_frames, size = clip_length, crop_size
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"crop_size must be a positive int, got {size!r}")
        num_samples = {"train": num_samples, "val": val_samples, "test": test_samples}[mode]
        if not isinstance(num_frames, int) or num_frames < 2:
            raise ValueError(f"clip_length must be an int >= 2, got {num_frames!r}")
        if not 2 <= num_colours <= len(PALETTE):
            raise ValueError(f"num_colours must be in 2..{len(PALETTE)}, got {num_colours!r}")
        if not isinstance(square, int) or not 1 <= square <= size:
            raise ValueError(f"square must be an int in 1..crop_size={size}, got {square!r}")
        if second_frames is None:
            second_frames = (max(num_frames - 3, 0), num_frames - 1)
        for name, (lo, hi) in (("first_frames", first_frames), ("second_frames", second_frames)):
            if not 0 <= lo <= hi < num_frames:
                raise ValueError(
                    f"{name} must be an inclusive range (lo, hi) with 0 <= lo <= hi < "
                    f"clip_length={num_frames}, got {(lo, hi)}"
                )
        if std <= 0:
            raise ValueError(f"std must be positive, got {std!r}")
        self.mode = mode
        self.num_samples = num_samples
        self.clip_length = num_frames
        self.crop_size = size
        self.num_colours = num_colours
        self.square = square
        self.first_frames = tuple(first_frames)
        self.second_frames = tuple(second_frames)
        self.seed = int(seed)
        self.mean = float(mean)
        self.std = float(std)
        # Contract attributes.
        self.num_classes = 2
        self.multi_label = False
        self.classes = ["different", "same"]
        self.videos = [f"{mode}-{i:06d}" for i in range(num_samples)]
        self._palette = torch.tensor(PALETTE[:num_colours], dtype=torch.float32)

    def __len__(self) -> int:
        return self.num_samples

    # -- generation ----------------------------------------------------------------------------
    def _fixed_seed(self, index: int) -> int:
        return derive_seed(self.seed, _SPLIT_OFFSET[self.mode], index)

    def _generator(self, index: int, draw_seed: int | None) -> torch.Generator:
        if draw_seed is not None and self.mode == "train":
            return torch.Generator().manual_seed(int(draw_seed))
        return torch.Generator().manual_seed(self._fixed_seed(index))

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool):
            raise TypeError("index must be an int or (int, seed), got a bool")
        try:
            index = operator.index(index)  # accepts numpy and 0-d tensor integers too
        except TypeError:
            raise TypeError(
                f"index must be an int or (int, seed), got {type(index).__name__}"
            ) from None
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} items")
        return index % self.num_samples

    def describe(self, index: int, seed: int | None = None) -> ClipSpec:
        """The squares of item ``index`` (or of the seeded draw ``(index, seed)``)."""
        index = self._check_index(index)
        gen = self._generator(index, seed)
        # One draw of uniforms per clip (cheap), mapped to the integers below; the re-draw loop
        # for overlapping squares only runs when the two frame ranges overlap.
        u = iter(torch.rand(8, generator=gen, dtype=torch.float64).tolist())

        def randint(lo: int, hi: int) -> int:  # inclusive range
            value = next(u, None)
            if value is None:
                value = float(torch.rand((), generator=gen, dtype=torch.float64))
            return lo + min(int(value * (hi - lo + 1)), hi - lo)

        label = index % 2
        colour_a = randint(0, self.num_colours - 1)
        # "different": B is uniform over the other colours, so B's colour is uniform overall in
        # both classes.  The draw is taken either way to keep the stream layout fixed.
        shift = randint(1, self.num_colours - 1)
        colour_b = colour_a if label else (colour_a + shift) % self.num_colours
        frame_a = randint(*self.first_frames)
        frame_b = randint(*self.second_frames)
        last = self.crop_size - self.square
        top_left_a = (randint(0, last), randint(0, last))
        top_left_b = (randint(0, last), randint(0, last))
        if frame_a == frame_b:
            # Only possible with overlapping frame ranges; keep B clear of A (re-draw B's place).
            for _ in range(100):
                if _disjoint(top_left_a, top_left_b, self.square):
                    break
                top_left_b = (randint(0, last), randint(0, last))
        return ClipSpec(frame_a, frame_b, top_left_a, top_left_b, colour_a, colour_b, self.square)

    def render(self, spec: ClipSpec) -> Tensor:
        """Un-normalised clip (3, T, H, W) in [0, 1] for ``spec``."""
        clip = torch.zeros(3, self.clip_length, self.crop_size, self.crop_size)
        s = spec.square
        for frame, (y, x), colour in (
            (spec.frame_a, spec.top_left_a, spec.colour_a),
            (spec.frame_b, spec.top_left_b, spec.colour_b),
        ):
            clip[:, frame, y : y + s, x : x + s] = self._palette[colour][:, None, None]
        return clip

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, object]:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise TypeError(
                    f"expected dataset[i] or dataset[(i, seed)], got a {len(key)}-tuple"
                )
            index, seed = key
            seed = int(seed)
        else:
            index, seed = key, None
        index = self._check_index(index)
        spec = self.describe(index, seed)
        clip = (self.render(spec) - self.mean) / self.std
        return {
            "clip": clip,
            "target": torch.tensor(spec.label, dtype=torch.int64),
            "index": index,
            "view": 0,
            "valid": True,
        }


def _disjoint(a: tuple[int, int], b: tuple[int, int], s: int) -> bool:
    return abs(a[0] - b[0]) >= s or abs(a[1] - b[1]) >= s
