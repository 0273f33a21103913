"""Clip loading speed: decoding only the frames a clip needs vs every frame (the original code).

Generates 10-s 256p H.264 videos (30 fps, libx264 defaults: key frame every 250 frames, CRF 23,
like ffmpeg's command line) in a temporary folder and measures training clips (32×2) per second
through a ``DataLoader`` with 1 and 2 workers:

* ``ours``: :class:`nlnet.data.VideoClipDataset` (seek to the key frame before the clip, skip
  unreferenced frames before it, stop after its last frame, convert only the kept frames);
* ``all frames``: the same dataset decoding every frame to RGB and then picking the clip's frames,
  the original Caffe2 op's way (§5.6).

Both include the same transforms (scale jitter, crop, flip, normalisation); a "decode only"
row isolates the decoder.  Rounds alternate between the two methods; the table gives the best
rate of each (the least disturbed by other processes) and the ratio of best and of median rates.  Run: ``PYTHONPATH=src python benchmarks/data.py``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from nlnet.data import build_dataset
from nlnet.data.datasets import VideoClipDataset
from nlnet.data.video import decode_all_frames
from videos import make_video


class AllFramesDataset(VideoClipDataset):
    """Reference: decode every frame, then keep the clip's (the original code's decoder)."""

    def read_clip(self, path, start, generator):
        from nlnet.data.sampling import clip_indices, train_clip_start

        frames = decode_all_frames(path, threads=self.decoder_threads)
        n = len(frames)
        if start is None:
            start = train_clip_start(n, self.clip_length, self.sampling_rate, generator)
        idx = clip_indices(start, n, self.clip_length, self.sampling_rate)
        return frames[idx], None, idx


class DecodeOnly(torch.utils.data.Dataset):
    def __init__(self, ds: VideoClipDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        # start frame from the worker's global RNG: a fresh random clip every time
        frames, _, _ = self.ds.read_clip(self.ds.records[i].path, None, None)
        return torch.from_numpy(frames).sum(dtype=torch.int64)


def rate(dataset, workers: int, items: int) -> float:
    sampler = [i % len(dataset) for i in range(items)]
    loader = DataLoader(
        dataset, batch_size=1, sampler=sampler, num_workers=workers, persistent_workers=False
    )
    it = iter(loader)
    next(it)  # start-up (worker fork) outside the timing
    t = time.perf_counter()
    n = 1
    for _ in it:
        n += 1
    return (n - 1) / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--videos", type=int, default=6)
    p.add_argument("--items", type=int, default=12, help="clips timed per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    p.add_argument("--gop", type=int, default=None, help="key-frame interval (default: x264's)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        for v in range(args.videos):
            make_video(
                Path(tmp) / "cls" / f"v{v}.mp4", 300, fps=30, size=(340, 256),
                pattern="texture", crf=23, gop=args.gop,
            )  # fmt: skip
        print(
            f"# generated {args.videos} videos of 300 frames, 340x256, 30 fps in "
            f"{time.perf_counter() - t:.1f}s; gop={args.gop or 'x264 default (250)'}"
        )
        common = dict(root=tmp, mode="train", clip_length=32, sampling_rate=2)
        ours = build_dataset("folder", **common)
        ref = AllFramesDataset(ours.records, ours.classes, clip_length=32, sampling_rate=2)
        print(
            "| workers | what | ours clips/s | all frames clips/s | ratio (best) | ratio (median) |"
        )
        print("|---|---|---|---|---|---|")
        for workers in (1, 2):
            for what, a, b in (
                ("decode only", DecodeOnly(ours), DecodeOnly(ref)),
                ("full item (decode + transforms)", ours, ref),
            ):
                # Rounds alternate between the two so that load from other processes hits both.
                r_ours, r_ref = [], []
                for _ in range(args.rounds):
                    r_ours.append(rate(a, workers, args.items))
                    r_ref.append(rate(b, workers, args.items))
                best = max(r_ours) / max(r_ref)
                med = statistics.median(r_ours) / statistics.median(r_ref)
                print(
                    f"| {workers} | {what} | {max(r_ours):.1f} | {max(r_ref):.1f} | "
                    f"{best:.2f}x | {med:.2f}x |"
                )
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"# peak RSS: main {peak_self:.0f} MiB, largest worker {peak:.0f} MiB")


if __name__ == "__main__":
    main()
