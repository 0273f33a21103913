"""Non-local operation, auto vs explicit, alternating in ONE process (forward+backward).

`nlnet bench` runs every case in a fresh process to measure peak memory cleanly; this script
answers the complementary question on a shared machine: with both backends seeing the same load,
which is faster?  It alternates explicit / auto for several rounds at one size and prints each
round, the median ratio and the achieved GFLOP/s (4·B·Nq·Nk·d per forward, 3× for fwd+bwd).

    PYTHONPATH=src python benchmarks/nonlocal_interleaved.py --nq 12544 --nk 12544 --d 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nlnet import nonlocal_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nq", type=int, default=12544)
    parser.add_argument("--nk", type=int, default=12544)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--form", default="embedded_gaussian")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    shape_q, shape_k = (args.batch, args.nq, args.d), (args.batch, args.nk, args.d)
    theta = torch.randn(*shape_q, generator=gen).requires_grad_()
    phi = torch.randn(*shape_k, generator=gen).requires_grad_()
    g = torch.randn(*shape_k, generator=gen).requires_grad_()
    w = torch.randn(2 * args.d, generator=gen) if args.form == "concatenation" else None
    grad_out = torch.randn(args.batch, args.nq, args.d, generator=gen)

    def step(backend: str) -> float:
        t0 = time.perf_counter()
        y = nonlocal_attention(theta, phi, g, pairwise=args.form, concat_weight=w, backend=backend)
        y.backward(grad_out)
        for t in (theta, phi, g):
            t.grad = None
        return time.perf_counter() - t0

    step("auto")  # warm-up (allocator, kernels)
    gflop = 3 * 4 * args.batch * args.nq * args.nk * args.d / 1e9
    times: dict[str, list[float]] = {"explicit": [], "auto": []}
    print(
        f"# {args.form}, B={args.batch}, {args.nq} × {args.nk}, d={args.d}, fwd+bwd, "
        f"float32, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| round | explicit s | auto s | auto/explicit |")
    print("|---|---|---|---|")
    for r in range(args.rounds):
        for backend in ("explicit", "auto"):
            times[backend].append(step(backend))
        print(
            f"| {r + 1} | {times['explicit'][-1]:.2f} | {times['auto'][-1]:.2f} | "
            f"{times['auto'][-1] / times['explicit'][-1]:.3f} |"
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"| median | {med['explicit']:.2f} | {med['auto']:.2f} | "
        f"{med['auto'] / med['explicit']:.3f} |"
    )
    if args.form in ("gaussian", "embedded_gaussian"):
        print(
            f"\nachieved: auto {gflop / med['auto']:.0f} GFLOP/s, "
            f"explicit {gflop / med['explicit']:.0f} GFLOP/s (fwd+bwd = 3 × 4·B·Nq·Nk·d)"
        )


if __name__ == "__main__":
    main()
