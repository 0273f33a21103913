"""Benchmark: NL I3D R50 (5 blocks) forward and forward+backward, auto vs explicit NL backend.

Batch 1, 224×224 crops, 32 and 128 frames (the paper's 32×2 and 128×1 clips), against the I3D
R50 baseline for the non-local overhead.

* Time: for each (frames, pass), one process builds the three models and times them side by side,
  interleaved (baseline, NL auto, NL explicit, baseline, …) after one warm-up each; the table
  gives the fastest of ``--repeats`` rounds, which is the most robust statistic on a shared
  machine.
* Memory: every case once more in a fresh process; CPU: the process's peak RSS (torch and the
  model included, so differences between cases are the cases' own); CUDA: ``max_memory_allocated``
  above the model.

    PYTHONPATH=src python benchmarks/models.py
    PYTHONPATH=src python benchmarks/models.py --frames 32 --backward-frames 32 --repeats 5
    PYTHONPATH=src python benchmarks/models.py --device cuda --bf16 --channels-last

nlnet's default network against the plain one (issue 11: the ``auto`` backend and the fused eval
path of ``nlnet.fuse`` vs ``backend="explicit"``, ``fast_inference=False``) is
``nlnet bench --model i3d_r50_nl5`` (:func:`nlnet.benchmark.run_model`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CASES = (
    ("baseline", "i3d_r50", "auto"),
    ("NL auto", "i3d_r50_nl5", "auto"),
    ("NL explicit", "i3d_r50_nl5", "explicit"),
)


def _setup(args: argparse.Namespace, model_name: str, backend: str, backward: bool):
    import torch

    from nlnet import create_model

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = create_model(model_name, backend=backend).to(device)
    x = torch.randn(1, 3, args.frames, args.size, args.size, device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        x = x.to(memory_format=torch.channels_last_3d)
    model.train(backward)

    def step() -> None:
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
        if backward:
            with autocast:
                loss = model(x).float().logsumexp(1).sum()
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), autocast:
                model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def time_worker(args: argparse.Namespace) -> None:
    """All three cases in one process, interleaved; the fastest round of each."""
    backward = args.mode == "fwd+bwd"
    steps = [_setup(args, model, backend, backward) for _, model, backend in CASES]
    for step in steps:
        step()  # warm-up
    best = [float("inf")] * len(steps)
    for _ in range(args.repeats):
        for i, step in enumerate(steps):
            t0 = time.perf_counter()
            step()
            best[i] = min(best[i], time.perf_counter() - t0)
    print(json.dumps({"time_s": best}))


def memory_worker(args: argparse.Namespace) -> None:
    """One case in a fresh process: its peak memory."""
    import torch

    step = _setup(args, args.model, args.backend, args.mode == "fwd+bwd")
    if args.device.startswith("cuda"):
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": peak}))


def _spawn(args: argparse.Namespace, extra: list[str], frames: int, mode: str) -> dict:
    cmd = [sys.executable, __file__, *extra, "--frames", str(frames), "--mode", mode]
    cmd += ["--size", str(args.size), "--repeats", str(args.repeats), "--device", args.device]
    cmd += ["--bf16"] if args.bf16 else []
    cmd += ["--channels-last"] if args.channels_last else []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--time-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="i3d_r50_nl5", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="fwd", help=argparse.SUPPRESS)
    p.add_argument("--frames", type=int, nargs="+", default=[32, 128])
    p.add_argument(
        "--backward-frames",
        type=int,
        nargs="*",
        default=[32, 128],
        help="clip lengths also timed forward+backward",
    )
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--channels-last", action="store_true", help="channels_last_3d (GPU)")
    args = p.parse_args()
    if args.time_worker or args.memory_worker:
        args.frames = args.frames[0]
        (time_worker if args.time_worker else memory_worker)(args)
        return

    from tqdm import tqdm

    plan = [
        (frames, mode)
        for frames in args.frames
        for mode in ("fwd", "fwd+bwd")
        if mode == "fwd" or frames in args.backward_frames
    ]
    times: dict[tuple[int, str], dict] = {}
    peaks: dict[tuple[int, str, str], dict] = {}
    with tqdm(total=len(plan) * (1 + len(CASES)), desc="benchmark processes") as bar:
        for frames, mode in plan:
            times[(frames, mode)] = _spawn(args, ["--time-worker"], frames, mode)
            bar.update()
            for label, model, backend in CASES:
                extra = ["--memory-worker", "--model", model, "--backend", backend]
                peaks[(frames, mode, label)] = _spawn(args, extra, frames, mode)
                bar.update()

    mib = 2**20
    peak_kind = "process peak RSS" if args.device == "cpu" else "max_memory_allocated above model"
    print(
        f"\ndevice {args.device}, batch 1, {args.size}x{args.size}, bf16={args.bf16}, "
        f"channels_last_3d={args.channels_last}; time = fastest of {args.repeats} interleaved "
        f"rounds; peak = {peak_kind}"
    )
    print(
        "| frames | pass | I3D R50 (s) | NL I3D auto (s) | NL I3D explicit (s) | explicit / auto "
        "| NL overhead (auto / baseline) | peak MiB: baseline / NL auto / NL explicit |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for frames, mode in plan:
        t = times[(frames, mode)]
        mem = " / ".join(
            f"{r['peak_bytes'] / mib:.0f}" if "peak_bytes" in r else r.get("error", "?")
            for r in (peaks[(frames, mode, label)] for label, _, _ in CASES)
        )
        if "error" in t:
            print(f"| {frames} | {mode} | {t['error']} | | | | | {mem} |")
            continue
        b, a, e = t["time_s"]
        print(
            f"| {frames} | {mode} | {b:.2f} | {a:.2f} | {e:.2f} | {e / a:.2f}x | {a / b:.2f}x "
            f"| {mem} |"
        )
        if args.device != "cpu":
            print(f"NL I3D auto, {frames} frames {mode}: {1 / a:.1f} clips/s")


if __name__ == "__main__":
    main()
