"""``nlnet visualize``: draw where a trained model's non-local block looks (paper Figure 3).

The command layer: it loads the model with the engine and the clip with :mod:`nlnet.data`, and
draws with :mod:`nlnet.viz.attention` (which imports neither).

    nlnet visualize --config CFG --checkpoint CK [--sample N | --video FILE] [--block NAME]
                    [--queries T,Y,X ...] [--top-k 20] [--mode arrows|heatmap] --out PNG

The clip is a sample of the config's data set (``--sample``, from ``--split``, default val) or
the first clip of a video file (``--video``: ``data.clip_length`` frames every
``data.sampling_rate``, shorter side scaled to ``data.crop_size`` and centre-cropped, normalised
like the data set).  Queries are pixel positions ``frame,y,x`` of that clip; by default the
``--num-queries`` positions where the block looks most are picked (:func:`pick_queries`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nlnet.cli.tasks import ensure_task
from nlnet.config import ConfigError, load_config
from nlnet.data.sampling import clip_indices
from nlnet.data.transforms import center_crop_box, mean_std, resized_crop, short_side_size
from nlnet.data.video import VideoDecodeError, decode_frames, probe_video
from nlnet.engine.evaluate import load_for_eval
from nlnet.engine.task import build_task
from nlnet.viz.attention import (
    attention_arrows,
    capture_attention,
    draw_attention_arrows,
    draw_attention_heatmap,
    find_nonlocal_blocks,
    pick_queries,
)


def parse_query(text: str) -> tuple[int, float, float]:
    """``"frame,y,x"`` (clip pixel coordinates) → (frame, y, x)."""
    parts = text.split(",")
    try:
        if len(parts) != 3:
            raise ValueError
        return int(parts[0]), float(parts[1]), float(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"query {text!r}: expected frame,y,x (e.g. 3,12,20)"
        ) from None


def _mean_std(dataset: Any, normalization: str) -> tuple[Tensor, Tensor]:
    """The data set's normalisation (else the config's), per channel, in 0..255 units."""
    mean = getattr(dataset, "mean", None)
    std = getattr(dataset, "std", None)
    if mean is None or std is None:
        mean, std = mean_std(normalization)
    m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    s = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    if m.max() <= 1.5:  # given for pixels in [0, 1]
        m, s = m * 255, s * 255
    return m.reshape(-1, 1, 1, 1), s.reshape(-1, 1, 1, 1)


def display_frames(clip: Tensor, mean: Tensor, std: Tensor) -> np.ndarray:
    """(C, T, H, W) network input → (T, H, W, 3) floats in [0, 1] for drawing."""
    x = (clip.detach().float().cpu() * std + mean) / 255
    return x.clamp(0, 1).permute(1, 2, 3, 0).numpy()


def load_video_clip(path: str | Path, clip_length: int, sampling_rate: int, size: int) -> Tensor:
    """The first clip of a video (``clip_length`` frames every ``sampling_rate``, looping) as
    (3, T, S, S) floats in [0, 255]: shorter side scaled to ``size``, centre crop (the data
    sets' test-time geometry, :mod:`nlnet.data.transforms`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"video not found: {path}")
    info = probe_video(path)
    frames = decode_frames(info, clip_indices(0, info.num_frames, clip_length, sampling_rate))
    h, w = short_side_size(frames.shape[1], frames.shape[2], size)
    top, left = center_crop_box(h, w, size)
    return resized_crop(frames, (h, w), top, left, size, size)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe the model was trained with")
    parser.add_argument("--checkpoint", required=True, help="engine checkpoint (.pt) or weights")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--sample", type=int, default=None, help="data set item (default 0)")
    src.add_argument("--video", default=None, help="a video file instead of a data set item")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"])
    parser.add_argument("--block", default=None, help="non-local block name (default: the first)")
    parser.add_argument("--list-blocks", action="store_true", help="print block names and exit")
    parser.add_argument(
        "--queries", nargs="+", type=parse_query, default=None, metavar="T,Y,X",
        help="query pixels frame,y,x of the clip (default: picked automatically)",
    )  # fmt: skip
    parser.add_argument("--num-queries", type=int, default=3, help="automatic queries (default 3)")
    parser.add_argument(
        "--pick", default="attended", choices=["attended", "peaked"],
        help="automatic query choice: where the block looks most, or most concentrated rows",
    )  # fmt: skip
    parser.add_argument("--top-k", type=int, default=20, help="arrows per query (default 20)")
    parser.add_argument("--mode", default="arrows", choices=["arrows", "heatmap"])
    parser.add_argument("--frames", type=int, nargs="+", default=None, help="frames to show")
    parser.add_argument("--scale", type=int, default=None, help="output pixels per clip pixel")
    parser.add_argument("--out", default="attention.png", help="PNG to write")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides (e.g. data.root=...)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        ensure_task(cfg.task)
        task = build_task(cfg.task, cfg)
        model = task.build_model()
        blocks = list(find_nonlocal_blocks(model))
        if args.list_blocks:
            print("\n".join(blocks) if blocks else "(no non-local blocks)")
            return 0
        load_for_eval(model, args.checkpoint)
        model.eval()
        if args.video is not None:
            try:
                dataset = task.build_dataset(args.split)  # only for its normalisation
            except Exception:  # no data on disk: fall back to the config's normalisation
                dataset = None
            mean, std = _mean_std(dataset, cfg.data.normalization)
            raw = load_video_clip(
                args.video, cfg.data.clip_length, cfg.data.sampling_rate, cfg.data.crop_size
            )
            clip = (raw - mean) / std
            source = args.video
        else:
            dataset = task.build_dataset(args.split)
            index = args.sample or 0
            if not 0 <= index < len(dataset):  # type: ignore[arg-type]
                raise ValueError(
                    f"--sample {index} is out of range: the {args.split} set has "
                    f"{len(dataset)} items"  # type: ignore[arg-type]
                )
            item = dataset[index]
            clip = item["clip"]
            mean, std = _mean_std(dataset, cfg.data.normalization)
            source = f"{args.split} item {index}"
        cap = capture_attention(model, clip[None].float(), block=args.block)
        grid = cap.grid
        if args.queries:
            queries = [grid.query_index(*q) for q in args.queries]
        else:
            queries = pick_queries(
                cap.weights, grid, args.num_queries, strategy=args.pick, frames=args.frames
            )
        frames = display_frames(clip, mean, std)
        if args.mode == "arrows":
            out = draw_attention_arrows(
                frames, cap.weights, grid, queries, args.out, top_k=args.top_k,
                shown_frames=args.frames, scale=args.scale,
            )  # fmt: skip
        else:
            out = draw_attention_heatmap(
                frames, cap.weights, grid, queries, args.out, shown_frames=args.frames,
                scale=args.scale,
            )  # fmt: skip
    except (ConfigError, FileNotFoundError, ValueError, IndexError, VideoDecodeError) as e:
        print(f"nlnet visualize: {e}", file=sys.stderr)
        return 2
    probs = torch.softmax(cap.output.float(), dim=1)[0]
    classes = list(getattr(dataset, "classes", None) or [])
    top = int(probs.argmax())
    name = classes[top] if top < len(classes) else str(top)
    print(f"{source}: predicted {name} ({float(probs[top]):.3f}); block {cap.name}")
    print(f"queries {grid.query_shape} -> keys {grid.key_shape} (sub-sampling {grid.subsample})")
    for q, arrows in zip(queries, attention_arrows(cap.weights, grid, queries, top_k=3)):
        f, y, x = grid.query_pixel(q)
        best = ", ".join(
            f"({a.key[0]},{a.key[1]:.1f},{a.key[2]:.1f}) {a.weight:.3f}" for a in arrows
        )
        print(f"  query ({f},{y:.1f},{x:.1f}) -> top keys {best}")
    print(out)
    return 0
