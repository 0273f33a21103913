"""Softmax forms (Eq. 2–3) on CPU, forward+backward: auto vs explicit, idle and under load.

Every round runs, back to back in ONE process, the same step with each method:

* ``explicit``: the (B, Nq, Nk) matrix (``backend="explicit"``, what the peers do);
* ``auto``: ``backend="auto"``: the blocked kernels, or the fused SDPA kernel at the sizes where
  it measured faster and the weights do not fit the blocked kernels' budget
  (``nlnet.ops.fast.SDPA_TRAINING_MAX_AFFINITY``, ``SCORE_CACHE_BYTES``);
* ``blocked``: the blocked kernels of :mod:`nlnet.ops.fast` whatever the size (tiles handed out
  to one-thread workers; the forward keeps the weights within ``SCORE_CACHE_BYTES`` and the
  backward recomputes the rest tile by tile);
* ``recompute``: the same with nothing kept (``SCORE_CACHE_BYTES = 0``, the leanest memory);
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch's fused CPU kernel);
* ``previous``: the kernel this replaced (fused flash forward + a blocked backward whose small
  ops each run on all threads), copied below for comparison.

With ``--load`` a competing process (one thread doing matrix products, like another job on the
machine) is started once and paused with SIGSTOP; each round then measures every method with the
competitor stopped ("idle") and again with it running ("loaded"), so both conditions are
interleaved in one run.  Times are medians over the rounds; the ratios are method / explicit.
GFLOP/s counts 3 × 4·B·Nq·Nk·d per forward+backward; "per CPU-s" divides by the process's CPU
time instead of the wall time, a measure of efficiency that other jobs on the machine disturb
much less (wall ≈ CPU time / threads on an idle machine when nothing spins).  Peak memory is
measured for explicit and auto in fresh processes (``nlnet bench``'s method: increase of the
peak RSS over the RSS once the inputs exist).

    PYTHONPATH=src python benchmarks/softmax_backward.py --load          # both paper sizes
    PYTHONPATH=src python benchmarks/softmax_backward.py --quick --load  # one small size
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from nlnet import nonlocal_attention
from nlnet.benchmark import Size
from nlnet.benchmark import run_case as fresh_process_case
from nlnet.ops import fast
from nlnet.ops.fast import _SoftmaxAttentionCPU

CASES = {  # name: (B, Nq, Nk, d)
    "res3, 128 frames, no sub-sampling": (1, 12544, 12544, 256),
    "res3, 32 frames, 1x2x2 sub-sampling": (2, 6272, 1568, 256),
}
QUICK = {"quick": (1, 2048, 2048, 64)}
METHODS = ("explicit", "auto", "blocked", "recompute", "sdpa", "previous")

COMPETITOR = (  # stops by itself when the benchmark is gone
    "import os, torch\n"
    "parent = os.getppid()\n"
    "torch.set_num_threads(1)\n"
    "a = torch.randn(1024, 1024)\n"
    "b = torch.empty_like(a)\n"
    "while os.getppid() == parent:\n"
    "    torch.mm(a, a, out=b)\n"
)


class _Previous(torch.autograd.Function):
    """The replaced kernel (nlnet.ops.fast at ce12987), for comparison only: d = dv, no mask."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Any:
        out4, lse4 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[:, None], k[:, None], v[:, None], scale=scale
        )
        out, lse = out4[:, 0], lse4[:, 0]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        q, k, v, out, lse = ctx.saved_tensors
        scale = ctx.scale
        grad_out = grad_out.contiguous()
        b, nq, _ = q.shape
        nk = k.shape[1]
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        delta = (grad_out * out).sum(dim=-1, keepdim=True)
        neg_lse = -lse[:, :, None]
        k_t, v_t = k.transpose(1, 2), v.transpose(1, 2)
        nb = max(1, min(nq, (1 << 21) // max(1, b * nk)))
        for i0 in range(0, nq, nb):
            i1 = min(i0 + nb, nq)
            qb, dyb = q[:, i0:i1], grad_out[:, i0:i1]
            p = torch.baddbmm(neg_lse[:, i0:i1], qb, k_t, alpha=scale).exp_()
            ds = torch.baddbmm(delta[:, i0:i1], dyb, v_t, beta=-1).mul_(p)
            torch.bmm(ds, k, out=dq[:, i0:i1])
            dk.baddbmm_(ds.transpose(1, 2), qb)
            dv.baddbmm_(p.transpose(1, 2), dyb)
        return dq.mul_(scale), dk.mul_(scale), dv, None


def _step(method: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, form: str) -> Any:
    scale = k.shape[-1] ** -0.5 if form == "embedded_gaussian" else 1.0
    if method in ("explicit", "auto"):
        return nonlocal_attention(q, k, v, pairwise=form, scale=scale, backend=method)
    if method == "sdpa":
        return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=scale)[:, 0]
    if method == "blocked":
        return _SoftmaxAttentionCPU.apply(q, k, v, scale, None, True)
    if method == "recompute":
        budget, fast.SCORE_CACHE_BYTES = fast.SCORE_CACHE_BYTES, 0
        try:
            return _SoftmaxAttentionCPU.apply(q, k, v, scale, None, True)
        finally:
            fast.SCORE_CACHE_BYTES = budget
    return _Previous.apply(q, k, v, scale)


def _measure(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


class Competitor:
    """A one-thread matmul loop in another process, paused and resumed with signals."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", COMPETITOR])
        time.sleep(3.0)  # let it import torch and start multiplying
        self.pause()

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        time.sleep(0.2)

    def close(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(timeout=10)


def run_case(
    name: str,
    shape: tuple[int, int, int, int],
    *,
    form: str,
    methods: tuple[str, ...],
    rounds: int,
    competitor: Competitor | None,
    ratios: list[tuple[str, float]],
) -> list[str]:
    """The table rows of one case; appends (case, auto/explicit) per load condition to ``ratios``."""
    b, nq, nk, d = shape
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, nq, d, generator=gen).requires_grad_()
    k = torch.randn(b, nk, d, generator=gen).requires_grad_()
    v = torch.randn(b, nk, d, generator=gen).requires_grad_()
    dy = torch.randn(b, nq, d, generator=gen)
    conditions = ("idle", "loaded") if competitor is not None else ("as is",)

    def step(method: str) -> None:
        _step(method, q, k, v, form).backward(dy)
        q.grad = k.grad = v.grad = None

    for method in methods:  # warm-up (allocator, kernels, worker threads)
        t0 = time.perf_counter()
        step(method)
        print(f"  warm-up {method}: {time.perf_counter() - t0:.2f}s", file=sys.stderr, flush=True)
    times: dict[tuple[str, str], list[float]] = {(c, m): [] for c in conditions for m in methods}
    cpu: dict[tuple[str, str], list[float]] = {(c, m): [] for c in conditions for m in methods}
    for _ in range(rounds):
        for cond in conditions:
            if cond == "loaded":
                competitor.resume()  # type: ignore[union-attr]
            for method in methods:
                seconds, cpu_seconds = _measure(lambda m=method: step(m))
                times[cond, method].append(seconds)
                cpu[cond, method].append(cpu_seconds)
                print(f"  {cond} {method}: {seconds:.2f}s", file=sys.stderr, flush=True)
            if cond == "loaded":
                competitor.pause()  # type: ignore[union-attr]
    gflop = 12 * b * nq * nk * d / 1e9
    rows = []
    for cond in conditions:
        med = {m: statistics.median(times[cond, m]) for m in methods}
        cells = [f"{name}: {b}×{nq}×{nk}, d={d}", cond]
        for m in methods:
            cells.append(f"{med[m]:.3f}")
        for m in methods[1:]:
            cells.append(f"{med[m] / med['explicit']:.3f}")
        ratios.append((f"{name}, {cond}", med["auto"] / med["explicit"]))
        cells.append(" / ".join(f"{gflop / med[m]:.0f}" for m in methods))
        cells.append(" / ".join(f"{gflop / statistics.median(cpu[cond, m]):.0f}" for m in methods))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


TARGET = 0.8  # issue 11: auto fwd+bwd time ≤ 0.8× explicit, idle and loaded


def memory_row(name: str, shape: tuple[int, int, int, int], form: str) -> str:
    """Peak MiB of explicit and auto, forward+backward, each in a fresh process."""
    b, nq, nk, d = shape
    size = Size(name, b, nq, nk, d)
    mib = {}
    for backend in ("explicit", "auto"):
        result = fresh_process_case(size, form, backend, "fwd+bwd", 1, "cpu")
        mib[backend] = result.get("mib", float("nan"))
    ratio = mib["auto"] / mib["explicit"]
    return f"| {name}: {b}×{nq}×{nk}, d={d} | {mib['explicit']:.0f} | {mib['auto']:.0f} | {ratio:.3f} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small size (about a minute)")
    parser.add_argument("--load", action="store_true", help="also measure with a competitor")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--form", default="embedded_gaussian", choices=("gaussian", "embedded_gaussian")
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--cases", nargs="+", type=int, metavar="I", help=f"indices into {list(CASES)}"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory")
    args = parser.parse_args()
    methods = tuple(["explicit"] + [m for m in args.methods if m != "explicit"])
    if "auto" not in methods:
        parser.error("--methods must include auto")
    cases = QUICK if args.quick else CASES
    if args.cases and not args.quick:
        names = list(CASES)
        if any(not 0 <= i < len(names) for i in args.cases):
            parser.error(f"--cases: indices 0–{len(names) - 1}")
        cases = {names[i]: CASES[names[i]] for i in args.cases}
    print(
        f"# {args.form}, forward+backward, float32, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, median of {args.rounds} "
        f"interleaved rounds{', competitor: 1 thread of matmuls (SIGSTOP when idle)' if args.load else ''}"
    )
    print(f"# load average at start: {os.getloadavg()[0]:.2f}\n")
    header = (
        ["case", "load"]
        + [f"{m} s" for m in methods]
        + [f"{m}/explicit" for m in methods[1:]]
        + ["GFLOP/s " + " / ".join(methods), "GFLOP per CPU-s " + " / ".join(methods)]
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    # SIGTERM (e.g. `timeout`) unwinds through `finally`, which stops the competitor.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    competitor = Competitor() if args.load else None
    ratios: list[tuple[str, float]] = []
    try:
        for name, shape in cases.items():
            for row in run_case(
                name,
                shape,
                form=args.form,
                methods=methods,
                rounds=args.rounds,
                competitor=competitor,
                ratios=ratios,
            ):
                print(row, flush=True)
    finally:
        if competitor is not None:
            competitor.close()
    if not args.no_memory:
        print("\n| case | explicit peak MiB | auto peak MiB | auto/explicit |\n|---|---|---|---|")
        for name, shape in cases.items():
            print(memory_row(name, shape, args.form), flush=True)
    print(f"\n# load average at end: {os.getloadavg()[0]:.2f}")
    if args.quick:  # a smoke run: the target is for the paper's sizes
        print(f"\n--quick: the {TARGET}x target (paper sizes) is not judged here")
        return 0
    print(f"\nTarget (issue 11): auto fwd+bwd <= {TARGET}x explicit")
    for case, r in ratios:
        print(f"- {case}: {r:.3f} -- {'MISSED' if r > TARGET else 'met'}")
    return 1 if any(r > TARGET for _, r in ratios) else 0


if __name__ == "__main__":
    sys.exit(main())
