"""Clip loading speed: decoding only the frames a clip needs vs every frame (the original code).

Generates 10-s 256p H.264 videos (30 fps, libx264 defaults: key frame every 250 frames, CRF 23,
like ffmpeg's command line) in a temporary folder and measures training clips (32×2) per second
through a ``DataLoader`` with 1 and 2 workers:

* ``ours``: :class:`nlnet.data.VideoClipDataset` (seek to the key frame before the clip, skip
  unreferenced frames before it, stop after its last frame, convert only the kept frames);
* ``all frames``: the same dataset decoding every frame to RGB and then picking the clip's frames,
  the original Caffe2 op's way (§5.6).

Both include the same transforms (scale jitter, crop, flip, normalisation); a "decode only"
row isolates the decoder.  Rounds alternate between the two methods; the table gives median
wall-clock rates and the median CPU time a worker spends per clip (the latter is what to compare
on a shared, loaded machine: it does not count time spent waiting for a core).  Run: ``PYTHONPATH=src python benchmarks/data.py``.
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


class Timed(torch.utils.data.Dataset):
    """Wraps a dataset; each item also reports the CPU time its worker spent on it."""

    def __init__(self, ds: VideoClipDataset, decode_only: bool) -> None:
        self.ds = ds
        self.decode_only = decode_only

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        t = time.process_time()
        if self.decode_only:
            # start frame from the worker's global RNG: a fresh random clip every time
            frames, _, _ = self.ds.read_clip(self.ds.records[i].path, None, None)
            out = torch.from_numpy(frames[:, :1, :1]).sum(dtype=torch.int64)
        else:
            out = self.ds[i]["clip"]
        return out, time.process_time() - t


def rate(dataset, workers: int, items: int) -> tuple[float, float]:
    """(clips per wall-clock second, mean worker CPU milliseconds per clip)."""
    sampler = [i % len(dataset) for i in range(items + 1)]
    loader = DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=workers)
    it = iter(loader)
    next(it)  # start-up (worker fork) outside the timing
    t = time.perf_counter()
    cpu = []
    for _, c in it:
        cpu.append(float(c))
    return len(cpu) / (time.perf_counter() - t), 1000 * statistics.mean(cpu)


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
            "| workers | what | ours clips/s | all frames clips/s | speed-up (wall) "
            "| ours CPU ms/clip | all frames CPU ms/clip | speed-up (CPU) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for workers in (1, 2):
            for what, decode_only in (("decode only", True), ("decode + transforms", False)):
                a, b = Timed(ours, decode_only), Timed(ref, decode_only)
                # Rounds alternate between the two so that load from other processes hits both.
                w_ours, w_ref, c_ours, c_ref = [], [], [], []
                for _ in range(args.rounds):
                    w, c = rate(a, workers, args.items)
                    w_ours.append(w)
                    c_ours.append(c)
                    w, c = rate(b, workers, args.items)
                    w_ref.append(w)
                    c_ref.append(c)
                wo, wr = statistics.median(w_ours), statistics.median(w_ref)
                co, cr = statistics.median(c_ours), statistics.median(c_ref)
                print(
                    f"| {workers} | {what} | {wo:.1f} | {wr:.1f} | {wo / wr:.2f}x "
                    f"| {co:.0f} | {cr:.0f} | {cr / co:.2f}x |"
                )
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"# peak RSS: main {peak_self:.0f} MiB, largest worker {peak:.0f} MiB")


if __name__ == "__main__":
    main()
