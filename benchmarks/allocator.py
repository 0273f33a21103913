"""The time cost of ``train.release_memory``: one training step with freed blocks of 4 MiB and
more unmapped, against glibc's own steady state, interleaved in one process.

glibc's mmap threshold is a process setting, so both settings alternate around the same
network's training step (nlnet train's defaults on this CPU): "release" is
``nlnet.engine.memory.MMAP_THRESHOLD`` (4 MiB), "keep" is glibc's dynamic ceiling (32 MiB, where a
process that has freed large blocks ends up).  Run it with and without PyTorch's huge-page
allocations, which are read once at start-up:

    THP_MEM_ALLOC_ENABLE=1 python benchmarks/allocator.py   # what the nlnet command runs with
    THP_MEM_ALLOC_ENABLE=0 python benchmarks/allocator.py   # 4 KiB pages

The peak RSS each gives is what ``nlnet bench --model`` measures (a fresh process per network).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="i3d_r50_nl5")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()

    import torch

    from nlnet import benchmark
    from nlnet.engine import memory

    libc = memory.glibc()
    if libc is None:
        print("needs glibc on Linux", file=sys.stderr)
        return 2
    settings = {
        "keep (32 MiB)": memory.GLIBC_DYNAMIC_CEILING,
        "release (4 MiB)": memory.MMAP_THRESHOLD,
    }
    default, _, x = benchmark._model_pair(args.model, args.frames, args.size, "train")
    step = partial(benchmark._train_step, amp=benchmark._training_defaults()[0])
    for threshold in settings.values():  # warm-up, both settings
        memory._set(libc, threshold)
        step(default, x)
    times: dict[str, list[float]] = {name: [] for name in settings}
    for r in range(args.rounds):
        order = list(settings.items())
        for name, threshold in order if r % 2 == 0 else order[::-1]:
            memory._set(libc, threshold)
            t0 = time.perf_counter()
            step(default, x)
            times[name].append(time.perf_counter() - t0)
    memory._set(libc, memory.GLIBC_DYNAMIC_CEILING)
    thp = os.environ.get(memory.THP_ENV, "unset")
    print(
        f"# {args.model}, {args.frames}×{args.size}², training step with nlnet train's defaults, "
        f"{torch.get_num_threads()} threads, {memory.THP_ENV}={thp}, median of {args.rounds} "
        "interleaved rounds\n"
    )
    print("| glibc setting | median s | ratio to keep | steps (s) |\n|---|---|---|---|")
    base = statistics.median(times["keep (32 MiB)"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {med / base:.3f} | {', '.join(f'{t:.3f}' for t in ts)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
