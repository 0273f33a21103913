"""Benchmark: the cost of one non-local block in Mask R-CNN R50-FPN (§6: "<5% computation").

Side by side, baseline vs +1 NL (and R101): counted FLOPs at an 800×1088 input (meta device,
1000 proposals, 100 detections) and the measured inference time of a padded batch of two images
(random weights, eval mode) with its peak memory.  Timings: all models in one process, run in
turn (interleaved, so a busy machine slows them alike), median of ``--repeats`` after a warm-up.
Peak memory: one forward per model in a fresh process (CPU: peak RSS; CUDA:
``max_memory_allocated``).

    PYTHONPATH=src python benchmarks/detection.py                  # CPU, shorter side 512
    PYTHONPATH=src python benchmarks/detection.py --device cuda --min-size 800 --max-size 1333
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

CASES = ("maskrcnn_r50_fpn", "maskrcnn_r50_fpn_nl", "maskrcnn_r101_fpn", "maskrcnn_r101_fpn_nl")


def _setup(name: str, args: argparse.Namespace):
    import torch

    from nlnet.detection import create_detector

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = create_detector(name, min_size=args.min_size, max_size=args.max_size)
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(1)
    # Two COCO-like aspect ratios: the batch is padded, so the block's padding mask is in use.
    images = [torch.rand(3, 480, 640, generator=gen), torch.rand(3, 427, 640, generator=gen)]
    return model, [img.to(device) for img in images]


def _forward(model, images) -> float:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        model(images)
    if images[0].device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def memory_worker(args: argparse.Namespace) -> None:
    import torch

    model, images = _setup(args.worker, args)
    cuda = images[0].device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    _forward(model, images)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_mib": peak}))


def interleaved_times(args: argparse.Namespace) -> dict[str, float]:
    setups = {name: _setup(name, args) for name in args.models}
    for model, images in setups.values():
        _forward(model, images)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in args.models}
    for _ in range(args.repeats):
        for name, (model, images) in setups.items():
            times[name].append(_forward(model, images))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--min-size", type=int, default=512)
    parser.add_argument("--max-size", type=int, default=853)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=list(CASES))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        memory_worker(args)
        return

    from nlnet.detection.flops import count_detector_flops

    rows = []
    for name in args.models:
        flops = count_detector_flops(name, (800, 1088)).total / 1e9
        cmd = [sys.executable, __file__, "--worker", name, "--device", args.device]
        cmd += ["--min-size", str(args.min_size), "--max-size", str(args.max_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append((name, flops, json.loads(out.strip().splitlines()[-1])))
    for (_, _, res), t in zip(rows, interleaved_times(args).values()):
        res["time"] = t
    print(
        f"device {args.device}; FLOPs at 800×1088; time: batch of 2 images (480×640, 427×640) "
        f"at shorter side {args.min_size}, median of {args.repeats}"
    )
    print(
        f"{'model':24s} {'GFLOPs':>8s} {'× base':>7s} {'time s':>8s} {'× base':>7s} "
        f"{'peak MiB':>9s}"
    )
    base: dict[str, tuple[float, float]] = {}
    for name, flops, res in rows:
        ref = base.setdefault(name.removesuffix("_nl"), (flops, res["time"]))
        print(
            f"{name:24s} {flops:8.1f} {flops / ref[0]:7.3f} {res['time']:8.3f} "
            f"{res['time'] / ref[1]:7.3f} {res['peak_mib']:9.0f}"
        )


if __name__ == "__main__":
    main()
