"""``nlnet predict VIDEO... --weights W``: classify videos with the test protocol of paper §4.2.

    nlnet predict clip.mp4 more_videos/ @list.txt --weights i3d_r50_nl5.orig_32x2_k400
    nlnet predict clip.mp4 --weights converted.pth --json --clips 3 --attention attention.png

``W`` is anything :func:`nlnet.create_model` accepts as ``weights=`` (a self-describing nlnet file,
a URL or a released-weights name).  Each video is read like the original release's test net
(reference §4.2, §5.6), with the settings the weight file's ``preprocessing`` records:

* ``clips`` clips (10) of ``frames`` frames every ``stride`` frames (32 × 2) at the native frame
  rate; clip ``k`` starts at frame ``floor(k·N/clips)`` and indices wrap modulo ``N``
  (:mod:`nlnet.data.sampling`), decoded with :func:`nlnet.data.video.decode_frames`;
* shorter side rescaled to ``test_scale`` (256), then 3 crops of ``crop``×``crop`` (256) along the
  longer side (start, centre, end) — or 1 centre crop, or the full frame — and mean/std
  normalisation on the 0–255 RGB scale (:mod:`nlnet.data.transforms`);
* every view's softmax is averaged.  With the fully-convolutional test head (``--test-head``,
  :class:`nlnet.models.Head`) each view's softmax is itself the average over the [T, 7, 7]
  window positions of res5, as in the release.

Per video it prints the top-5 labels with their probabilities (class names from the weight file,
else the Kinetics-400 names when the model has 400 outputs, else class indices); ``--json``
prints one JSON object for machines.  A missing or undecodable file gets an error entry and the
other videos are still scored.  Exit code 0 when at least one video was scored, 1 when none was,
2 for a usage error (no input, unloadable weights).

The same reading and batching serve ``nlnet extract-features`` (:mod:`nlnet.features`).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from nlnet.data.sampling import clip_indices, evenly_spaced_clip_start
from nlnet.data.transforms import (
    ORIGINAL_MEAN_STD,
    TEST_CROPS,
    normalize,
    resized_crop,
    short_side_size,
    three_crop_boxes,
)
from nlnet.data.video import VideoDecodeError, decode_frames, is_video_path, probe_video

PROG = "nlnet predict"

# The original release's test protocol (reference §4.2, §5.6), used for what a file leaves out.
DEFAULT_PREPROCESSING: dict[str, Any] = {
    "mean": list(ORIGINAL_MEAN_STD[0]),
    "std": list(ORIGINAL_MEAN_STD[1]),
    "frames": 32,
    "stride": 2,
    "test_scale": 256,
    "crop": 256,
    "clips": 10,
    "crops": 3,
}
_CROPS_TO_TEST_CROP = {3: "three", 1: "center"}


# -- the test protocol ------------------------------------------------------------------------
@dataclass(frozen=True)
class TestProtocol:
    """How a video becomes views (§4.2): ``clips`` clips × the spatial views of ``test_crop``.

    ``frames``/``stride``: clip length and sampling rate (native frames); ``scale``: the shorter
    side after resizing; ``crop``: the side of the square crops (``test_crop`` "three" or
    "center"; ignored for "full"); ``mean``/``std``: per RGB channel, 0–255 scale.
    """

    __test__ = False  # not a pytest class despite the name

    frames: int = 32
    stride: int = 2
    clips: int = 10
    scale: int = 256
    crop: int = 256
    test_crop: str = "three"
    mean: tuple[float, float, float] = ORIGINAL_MEAN_STD[0]  # type: ignore[assignment]
    std: tuple[float, float, float] = ORIGINAL_MEAN_STD[1]  # type: ignore[assignment]

    def __post_init__(self) -> None:
        for name in ("frames", "stride", "clips", "scale", "crop"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.test_crop not in TEST_CROPS:
            raise ValueError(f"test_crop must be one of {TEST_CROPS}, got {self.test_crop!r}")
        if self.test_crop != "full" and self.crop > self.scale:
            raise ValueError(
                f"crop {self.crop} is larger than the test scale {self.scale} (the shorter side "
                f"after resizing); pass --scale >= {self.crop} or a smaller --crop"
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"{name} needs 3 values (R, G, B), got {value!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std!r}")

    @property
    def views_per_clip(self) -> int:
        return 3 if self.test_crop == "three" else 1

    @property
    def num_views(self) -> int:
        return self.clips * self.views_per_clip

    @classmethod
    def from_preprocessing(
        cls,
        preprocessing: Mapping[str, Any] | None,
        *,
        clips: int | None = None,
        crop: int | None = None,
        scale: int | None = None,
        frames: int | None = None,
        stride: int | None = None,
        test_crop: str | None = None,
    ) -> TestProtocol:
        """The protocol a weight file's ``preprocessing`` records, with explicit overrides.

        Missing entries take the original release's values (:data:`DEFAULT_PREPROCESSING`).
        A ``crop`` given without a ``scale`` also sets the scale (the release's crops are as
        large as the shorter side: 256 crops of a 256 frame).
        """
        pre = {
            **DEFAULT_PREPROCESSING,
            **{k: v for k, v in (preprocessing or {}).items() if v is not None},
        }
        if test_crop is None:
            crops = pre.get("crops", 3)
            if isinstance(crops, str):
                test_crop = crops
            elif crops in _CROPS_TO_TEST_CROP:
                test_crop = _CROPS_TO_TEST_CROP[crops]
            else:
                raise ValueError(f"preprocessing 'crops' must be 1 or 3, got {crops!r}")
        if scale is None:
            scale = crop if crop is not None else int(pre["test_scale"])
        return cls(
            frames=int(frames if frames is not None else pre["frames"]),
            stride=int(stride if stride is not None else pre["stride"]),
            clips=int(clips if clips is not None else pre["clips"]),
            scale=int(scale),
            crop=int(crop if crop is not None else pre["crop"]),
            test_crop=test_crop,
            mean=tuple(float(m) for m in pre["mean"]),  # type: ignore[arg-type]
            std=tuple(float(s) for s in pre["std"]),  # type: ignore[arg-type]
        )


def clip_views(frames: np.ndarray | Tensor, protocol: TestProtocol) -> list[Tensor]:
    """The spatial views of one decoded clip ``(T, H, W, 3)`` uint8 → ``(3, T, h, w)`` floats.

    Shorter side to ``protocol.scale``; the 3 crops along the longer side (start, centre, end),
    the centre crop or the full frame (same geometry as
    :func:`nlnet.data.transforms.eval_transform`), normalised with the protocol's mean/std.
    """
    t = torch.as_tensor(frames)
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected (T, H, W, 3) frames, got shape {tuple(t.shape)}")
    h, w = short_side_size(t.shape[1], t.shape[2], protocol.scale)
    if protocol.test_crop == "full":
        boxes, ch, cw = [(0, 0)], h, w
    else:
        boxes, ch, cw = three_crop_boxes(h, w, protocol.crop), protocol.crop, protocol.crop
        if protocol.test_crop == "center":
            boxes = [boxes[1]]
    return [
        normalize(resized_crop(t, (h, w), top, left, ch, cw), protocol.mean, protocol.std)
        for top, left in boxes
    ]


def video_clips(path: str, protocol: TestProtocol) -> Iterator[np.ndarray]:
    """The ``protocol.clips`` test clips of a video as decoded uint8 frames (§4.2).

    Clip ``k`` starts at native frame ``floor(k·N/clips)``; frame indices wrap modulo ``N``.
    Raises :class:`~nlnet.data.video.VideoDecodeError` naming the file when it cannot be read.
    """
    info = probe_video(path)
    n = info.num_frames
    for k in range(protocol.clips):
        start = evenly_spaced_clip_start(n, protocol.clips, k)
        yield decode_frames(info, clip_indices(start, n, protocol.frames, protocol.stride))


def video_views(path: str, protocol: TestProtocol) -> Iterator[Tensor]:
    """Every view of a video in the release's order (clip-major, then crops)."""
    for frames in video_clips(path, protocol):
        yield from clip_views(frames, protocol)


_T = TypeVar("_T")


def prefetch(items: Iterator[_T], depth: int) -> Generator[_T, None, None]:
    """Iterate ``items`` in a background thread, up to ``depth`` items ahead.

    Decoding and resizing the next views (PyAV and PyTorch release the GIL) then overlaps the
    model's forward pass on an accelerator.  Items come in order; an exception of ``items`` is
    raised here; when the consumer stops early, the thread stops after its current item.
    ``depth`` 0 iterates in the calling thread.
    """
    if depth <= 0:
        yield from items
        return
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                q.put((kind, value), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put("item", item):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put("error", e)
            return
        put("end", None)

    thread = threading.Thread(target=work, name="nlnet-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value
    finally:
        stop.set()
        thread.join()


# -- running the model over the views ---------------------------------------------------------
def classifier_input_module(model: nn.Module) -> nn.Module:
    """The module whose input is the last stage's features: ``head`` (VideoResNet) or ``fc``."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module):
        return head
    fc = getattr(model, "fc", None)
    if isinstance(fc, nn.Module):
        return fc
    raise ValueError(
        f"cannot find the classifier of {type(model).__name__} (expected a 'head' or 'fc' "
        f"module) to read its pooled features from"
    )


def _pooled(x: Tensor) -> Tensor:
    """(B, C, ...) → (B, C): the mean over every axis after the channels."""
    return x.flatten(2).mean(dim=2) if x.dim() > 2 else x


def module_by_name(model: nn.Module, name: str) -> nn.Module:
    """``model``'s sub-module ``name`` (e.g. ``res4.nonlocal5``), or a ValueError listing names."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    from nlnet.models import find_nonlocal_blocks

    stages = [n for n, _ in model.named_children()]
    raise ValueError(
        f"the model has no module {name!r}; its non-local blocks: {list(find_nonlocal_blocks(model))}, "
        f"its top-level modules: {stages} (any name of model.named_modules() works)"
    )


def _on_output(fn: Callable[[Tensor], None]) -> Callable[..., None]:
    """A forward hook passing the module's output (the first one of a tuple) to ``fn``."""

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        fn(output[0] if isinstance(output, tuple) else output)

    return hook


@dataclass
class VideoOutput:
    """What :func:`infer_video` computes for one video (every value averaged over its views)."""

    probs: Tensor  # (num_classes,) float64, the mean of the views' softmax
    views: int
    features: Tensor | None = None  # (C,) float64 pooled last-stage features
    blocks: dict[str, Tensor] = field(default_factory=dict)


@torch.no_grad()
def infer_video(
    model: nn.Module,
    path: str,
    protocol: TestProtocol,
    *,
    batch_size: int = 6,
    device: torch.device | str = "cpu",
    features: bool = False,
    blocks: Sequence[str] = (),
    block_pool: str = "avg",
    prefetch_views: int = 0,
) -> VideoOutput:
    """Score every view of ``path`` (in batches of ``batch_size`` views) and average (§4.2).

    ``prefetch_views`` > 0 decodes and transforms that many views ahead in a background thread
    (:func:`prefetch`; same results, faster on an accelerator).

    ``features``: also average the classifier's input, pooled over T×H×W (res5's 2048-d
    features for a ResNet-50).  ``blocks``: names of sub-modules whose output is captured with a
    forward hook: ``block_pool="avg"`` pools each view's output over T×H×W and averages over
    views → (C,); ``"none"`` keeps every view's full output → (views, C, T, H, W).
    The model must be in eval mode.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if block_pool not in ("avg", "none"):
        raise ValueError(f"block_pool must be 'avg' or 'none', got {block_pool!r}")
    device = torch.device(device)
    captured: dict[str, list[Tensor]] = {}
    handles: list[Any] = []

    def keep(name: str, pool: bool) -> Callable[..., None]:
        def hook(x: Tensor) -> None:
            x = x.detach().double() if pool else x.detach().float()
            captured.setdefault(name, []).append((_pooled(x) if pool else x).cpu())

        return hook

    try:
        if features:
            feature_hook = keep("\0features", True)
            handles.append(
                classifier_input_module(model).register_forward_pre_hook(
                    lambda _m, args: feature_hook(args[0])
                )
            )
        for name in blocks:
            block_hook = keep(name, block_pool == "avg")
            handles.append(
                module_by_name(model, name).register_forward_hook(_on_output(block_hook))
            )
        total: Tensor | None = None
        count = 0
        batch: list[Tensor] = []

        def flush() -> None:
            nonlocal total, count
            x = torch.stack(batch).to(device, non_blocking=True)
            probs = torch.softmax(model(x).float(), dim=1).double().sum(0).cpu()
            total = probs if total is None else total + probs
            count += len(batch)
            batch.clear()

        views = prefetch(video_views(path, protocol), prefetch_views)
        try:  # close() stops the prefetch thread at once if the model fails
            for view in views:
                batch.append(view)
                if len(batch) == batch_size:
                    flush()
            if batch:
                flush()
        finally:
            views.close()
    finally:
        for handle in handles:
            handle.remove()
    if total is None or count == 0:
        raise VideoDecodeError(f"{path}: no views")
    out = VideoOutput(probs=total / count, views=count)
    if features:
        out.features = torch.cat(captured.pop("\0features")).mean(0)
    for name in blocks:
        parts = torch.cat(captured[name])
        out.blocks[name] = parts.mean(0) if block_pool == "avg" else parts
    return out


# -- loading the model ------------------------------------------------------------------------
def _load(weights: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """The network ``weights`` describes and its ``pretrained_cfg`` (arch, classes, ...), through
    :func:`nlnet.create_model` (paths, URLs, released-weights names)."""
    from nlnet.models import create_model

    model = create_model(weights=weights)
    return model, dict(getattr(model, "pretrained_cfg", None) or {})


TEST_HEAD_CHOICES = ("auto", "global", "fully_conv")


def set_test_head(model: nn.Module, test_head: str, cfg: Mapping[str, Any]) -> str:
    """Switch ``model``'s eval head; returns the head used.

    ``auto``: what the weight file's preprocessing names (``test_head``), else the original
    release's fully-convolutional head (reference §4.2; PySlowFast's test head is the same) for
    a :class:`~nlnet.models.VideoResNet`, except for mmaction2 weights (converted from mmaction2
    or its ``variant``; mmaction2 tests with global pooling), and the
    global head for other models.
    """
    from nlnet.models import VideoResNet

    if test_head not in TEST_HEAD_CHOICES:
        raise ValueError(f"test_head must be one of {TEST_HEAD_CHOICES}, got {test_head!r}")
    is_resnet = isinstance(model, VideoResNet)
    if test_head == "auto":
        pre = cfg.get("preprocessing") or {}
        if pre.get("test_head") in ("global", "fully_conv"):
            test_head = pre["test_head"]
        elif is_resnet and "mmaction2" not in (
            cfg.get("converted_from"),
            (cfg.get("model_kwargs") or {}).get("variant"),
        ):
            test_head = "fully_conv"
        else:
            test_head = "global"
    if is_resnet:
        model.test_head = test_head  # type: ignore[union-attr]
    elif test_head != "global":
        raise ValueError(
            f"--test-head {test_head} needs a VideoResNet (a paper model); "
            f"{type(model).__name__} has only the global head"
        )
    return test_head


def class_names(cfg: Mapping[str, Any], num_classes: int) -> list[str]:
    """Label names: the weight file's, else Kinetics-400's for 400 outputs, else indices."""
    classes = cfg.get("classes")
    if classes and len(classes) == num_classes:
        return [str(c) for c in classes]
    if num_classes == 400:
        from nlnet.classes import kinetics400

        return kinetics400()
    return [str(i) for i in range(num_classes)]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class LoadedModel:
    """A model ready for :func:`infer_video`, with what the report needs to say about it."""

    model: nn.Module
    cfg: dict[str, Any]
    classes: list[str]
    protocol: TestProtocol
    test_head: str
    device: torch.device
    prefetch: int = 0  # views decoded ahead in a background thread

    def describe(self) -> dict[str, Any]:
        return {
            "arch": self.cfg.get("arch"),
            "num_classes": len(self.classes),
            "test_head": self.test_head,
            "protocol": {**asdict(self.protocol), "views": self.protocol.num_views},
            "device": str(self.device),
        }


def load_model(args: argparse.Namespace) -> LoadedModel:
    """Build the model of ``args.weights`` with the protocol and head the arguments select."""
    model, cfg = _load(args.weights)
    protocol = TestProtocol.from_preprocessing(
        cfg.get("preprocessing"),
        clips=args.clips,
        crop=args.crop,
        scale=args.scale,
        frames=args.frames,
        stride=args.stride,
        test_crop=args.test_crop,
    )
    device = torch.device(args.device or default_device())
    head = set_test_head(model, getattr(args, "test_head", "global"), cfg)
    model.to(device).eval()
    num_classes = cfg.get("num_classes")
    if not num_classes:
        num_classes = int(classifier_output_size(model))
    depth = getattr(args, "prefetch", None)
    if depth is None:  # overlap decoding with an accelerator; on CPU they share the cores
        depth = 2 * getattr(args, "batch_size", 6) if device.type != "cpu" else 0
    return LoadedModel(
        model, cfg, class_names(cfg, int(num_classes)), protocol, head, device, max(0, depth)
    )


def classifier_output_size(model: nn.Module) -> int:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("cannot tell the number of classes of the model (no nn.Linear)")
    return linears[-1].out_features


# -- inputs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoInput:
    """One video to process: its path, the name of its outputs, or why it cannot be used."""

    path: str
    name: str  # relative name (folder inputs keep their sub-folders), for output files
    error: str | None = None


def _read_list(list_file: str) -> list[str]:
    """Paths of a list file: one per line; blank lines and ``#`` comments are skipped; a
    trailing integer label (``<path> <label>``, the Kinetics lists) is dropped; relative paths
    are taken from the current folder, else from the list file's folder."""
    base = Path(list_file).parent
    try:
        text = Path(list_file).read_text(encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"cannot read the list file {list_file}: {e}") from None
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if not os.path.exists(line) and len(parts) == 2 and parts[1].lstrip("-").isdigit():
            line = parts[0]
        if not os.path.isabs(line) and not os.path.exists(line) and (base / line).exists():
            line = str(base / line)
        out.append(line)
    return out


def collect_inputs(items: Sequence[str], list_files: Sequence[str] = ()) -> list[VideoInput]:
    """Videos named by ``items`` (files, folders searched recursively for videos, ``@list``
    files) and ``list_files``, in order, without repeats.  A folder without videos becomes an
    error entry; a missing file stays an entry (its error is found when it is read)."""
    out: list[VideoInput] = []
    seen: set[str] = set()
    names: set[str] = set()

    def add(path: str, name: str, error: str | None = None) -> None:
        key = os.path.normpath(os.path.abspath(path))
        if key in seen:
            return
        seen.add(key)
        base, k = name, 1
        while name in names:
            k += 1
            name = f"{base}-{k}"
        names.add(name)
        out.append(VideoInput(path, name, error))

    queue: list[str] = [*items, *(f"@{f}" for f in list_files)]
    for item in queue:
        if item.startswith("@") and len(item) > 1:
            for path in _read_list(item[1:]):
                add(path, Path(path).stem)
        elif os.path.isdir(item):
            found = sorted(
                os.path.join(root, f)
                for root, _, files in os.walk(item)
                for f in files
                if is_video_path(f)
            )
            if not found:
                add(item, Path(item).name or "folder", f"{item}: no video files in the folder")
            for path in found:
                add(path, str(Path(os.path.relpath(path, item)).with_suffix("")))
        else:
            add(item, Path(item).stem)
    return out


# -- the command ------------------------------------------------------------------------------
def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments shared by ``predict`` and ``extract-features``."""
    parser.add_argument(
        "videos", nargs="*", metavar="VIDEO",
        help="video files, folders (searched recursively) or @list.txt files",
    )  # fmt: skip
    parser.add_argument(
        "--list", action="append", default=[], metavar="FILE",
        help="a text file with one video path per line (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--weights", required=True,
        help="weight file, URL or released-weights name (anything create_model(weights=) takes)",
    )  # fmt: skip
    g = parser.add_argument_group("test protocol (default: the weight file's preprocessing)")
    g.add_argument("--clips", type=int, default=None, help="clips per video (10)")
    g.add_argument(
        "--crop", type=int, default=None,
        help="crop side (256); without --scale it also sets the shorter side",
    )  # fmt: skip
    g.add_argument("--scale", type=int, default=None, help="shorter side before cropping (256)")
    g.add_argument(
        "--test-crop", choices=TEST_CROPS, default=None,
        help="three crops along the longer side, one centre crop, or the full frame",
    )  # fmt: skip
    g.add_argument("--frames", type=int, default=None, help="frames per clip (32)")
    g.add_argument("--stride", type=int, default=None, help="sampling rate in frames (2)")
    parser.add_argument(
        "--test-head", choices=TEST_HEAD_CHOICES, default="auto",
        help="eval head: the release's fully-convolutional one (auto for paper models) or global",
    )  # fmt: skip
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=6, help="views per forward pass (default 6)"
    )
    parser.add_argument(
        "--prefetch", type=int, default=None, metavar="N",
        help="views decoded ahead in a background thread (default: 2 batches on a GPU, 0 on CPU)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--top-k", type=int, default=5, help="labels printed per video (5)")
    parser.add_argument(
        "--attention", default=None, metavar="OUT",
        help="draw Figure 3's arrows for each video: a .png for one video, else a folder",
    )  # fmt: skip
    parser.add_argument(
        "--attention-block", default=None, help="non-local block to draw (default: the first)"
    )


def progress(items: Sequence[Any], desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="video", file=sys.stderr, dynamic_ncols=True, disable=None)


def prepare(args: argparse.Namespace, prog: str) -> tuple[list[VideoInput], LoadedModel] | int:
    """Inputs and model for a command, or an exit code (2) after printing the usage error."""
    if args.batch_size < 1:
        print(f"{prog}: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        inputs = collect_inputs(args.videos, args.list)
    except FileNotFoundError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if not inputs:
        print(f"{prog}: no videos given (pass files, folders or @list.txt)", file=sys.stderr)
        return 2
    try:
        loaded = load_model(args)
    except (FileNotFoundError, ValueError, TypeError, KeyError, RuntimeError, OSError) as e:
        print(f"{prog}: cannot load the weights {args.weights}: {e}", file=sys.stderr)
        return 2
    return inputs, loaded


# Errors that belong to one video: reported in its entry, the others are still processed.
PER_VIDEO_ERRORS = (VideoDecodeError, ValueError, IndexError, RuntimeError, OSError)


def _attention_target(out: str, inputs: Sequence[VideoInput]) -> Callable[[VideoInput], Path]:
    if out.lower().endswith(".png") and len(inputs) == 1:
        return lambda _v: Path(out)
    return lambda v: Path(out) / f"{v.name}.png"


def draw_attention(
    loaded: LoadedModel, video: VideoInput, out: Path, block: str | None
) -> dict[str, Any]:
    """Figure 3 for one view of the video (the middle clip's centre view) with the same model."""
    from nlnet.viz.attention import capture_attention, draw_attention_arrows, pick_queries

    protocol = loaded.protocol
    middle = protocol.clips // 2
    for k, frames in enumerate(video_clips(video.path, protocol)):
        if k == middle:
            views = clip_views(frames, protocol)
            clip = views[len(views) // 2]
            break
    cap = capture_attention(loaded.model, clip[None].to(loaded.device), block=block)
    queries = pick_queries(cap.weights, cap.grid, 3)
    # the view back in [0, 1] RGB for drawing: (3, T, H, W) → (T, H, W, 3)
    mean = torch.tensor(protocol.mean).view(3, 1, 1, 1)
    std = torch.tensor(protocol.std).view(3, 1, 1, 1)
    frames_01 = ((clip * std + mean) / 255).clamp(0, 1).permute(1, 2, 3, 0).numpy()
    path = draw_attention_arrows(frames_01, cap.weights, cap.grid, queries, out, top_k=20)
    return {"attention": str(path), "attention_block": cap.name, "attention_clip": middle}


def predict_videos(
    loaded: LoadedModel,
    inputs: Sequence[VideoInput],
    *,
    top_k: int = 5,
    batch_size: int = 6,
    attention: str | None = None,
    attention_block: str | None = None,
) -> list[dict[str, Any]]:
    """One result per input: ``{"video", "views", "predictions": [{label, index, probability}]}``
    or ``{"video", "error"}``."""
    results: list[dict[str, Any]] = []
    target = _attention_target(attention, inputs) if attention else None
    k = min(top_k, len(loaded.classes))
    for video in progress(inputs, "predict"):
        if video.error:
            results.append({"video": video.path, "error": video.error})
            continue
        try:
            out = infer_video(
                loaded.model, video.path, loaded.protocol, batch_size=batch_size,
                device=loaded.device, prefetch_views=loaded.prefetch,
            )  # fmt: skip
        except PER_VIDEO_ERRORS as e:
            results.append({"video": video.path, "error": _message(video.path, e)})
            continue
        if not bool(torch.isfinite(out.probs).all()):
            results.append(
                {"video": video.path, "error": f"{video.path}: the model's scores are not finite"}
            )
            continue
        probs, idx = out.probs.topk(k)
        entry: dict[str, Any] = {
            "video": video.path,
            "views": out.views,
            "predictions": [
                {"label": loaded.classes[i], "index": int(i), "probability": float(p)}
                for p, i in zip(probs.tolist(), idx.tolist())
            ],
        }
        if target is not None:
            try:
                entry.update(draw_attention(loaded, video, target(video), attention_block))
            except PER_VIDEO_ERRORS as e:
                entry["attention_error"] = _message(video.path, e)
        results.append(entry)
    return results


def _message(path: str, err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text if path in text else f"{path}: {text}"


def _print_text(results: Sequence[dict[str, Any]]) -> None:
    for r in results:
        if "error" in r:
            print(f"ERROR {r['error']}")  # the message names the file
            continue
        print(f"{r['video']} ({r['views']} views)")
        for p in r["predictions"]:
            print(f"  {p['probability']:7.4f}  {p['label']}")
        if "attention" in r:
            print(f"  attention ({r['attention_block']}): {r['attention']}")
        if "attention_error" in r:
            print(f"  attention: ERROR {r['attention_error']}")


def summary(results: Sequence[dict[str, Any]]) -> tuple[int, int]:
    failed = sum(1 for r in results if "error" in r)
    return len(results) - failed, failed


def run(args: argparse.Namespace) -> int:
    ready = prepare(args, PROG)
    if isinstance(ready, int):
        return ready
    inputs, loaded = ready
    if args.top_k < 1:
        print(f"{PROG}: --top-k must be >= 1, got {args.top_k}", file=sys.stderr)
        return 2
    if args.attention:
        from nlnet.models import find_nonlocal_blocks

        blocks = list(find_nonlocal_blocks(loaded.model))
        if not blocks:
            print(f"{PROG}: --attention needs a model with non-local blocks", file=sys.stderr)
            return 2
        if args.attention_block is not None and args.attention_block not in blocks:
            print(
                f"{PROG}: unknown --attention-block {args.attention_block!r}; the model's "
                f"non-local blocks: {blocks}",
                file=sys.stderr,
            )
            return 2
    results = predict_videos(
        loaded, inputs, top_k=args.top_k, batch_size=args.batch_size,
        attention=args.attention, attention_block=args.attention_block,
    )  # fmt: skip
    scored, failed = summary(results)
    if args.json:
        report = {"weights": str(args.weights), **loaded.describe(), "videos": results}
        report.update(scored=scored, failed=failed)
        print(json.dumps(report, indent=2, allow_nan=False))
    else:
        _print_text(results)
    print(f"{PROG}: scored {scored} of {len(results)} videos ({failed} failed)", file=sys.stderr)
    return 0 if scored else 1
