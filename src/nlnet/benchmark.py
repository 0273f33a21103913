"""``nlnet bench``: the non-local operation's ``auto`` backend against the explicit N×N' matrix.

``nlnet bench --model i3d_r50_nl5 [--frames 8 32]`` times the whole network instead: nlnet's
default (``create_model(name)``: the ``auto`` NL backend, and in eval the fast path of
:mod:`nlnet.fuse`) against the plain network (``backend="explicit"``, ``fast_inference=False``),
interleaved in one process, eval forward and training step, with each one's peak memory in a
fresh process (peak RSS and the live heap of :class:`LiveHeapPeak`, both judged); it exits
non-zero when a target of issue 11 is missed.

For each pairwise form (§3.2, Eq. 2–5) and each of the paper's sizes, forward and
forward+backward are timed (median of several repeats after a warm-up) and their peak memory
measured, every case in a fresh child process so that one case's allocations cannot hide
another's peak.  Peak memory is the increase of the child's peak RSS (``VmHWM`` in
``/proc/self/status``, reset through ``/proc/self/clear_refs``) over its RSS once the inputs
exist; on CUDA it is ``torch.cuda.max_memory_allocated``.  The peers' way of computing
concatenation (the materialised B×2d×Nq×Nk pair tensor, AlexHex7/mmcv) is timed where it fits.

FLOPs convention (softmax forms): forward 4·B·Nq·Nk·d (two matmuls), forward+backward 3× that.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from tqdm import tqdm

from nlnet.io import atomic_write_text

FORMS = ("gaussian", "embedded_gaussian", "dot_product", "concatenation")


@dataclass(frozen=True)
class Size:
    """One attention problem: B, queries Nq, keys Nk, width d (= dv)."""

    name: str
    b: int
    nq: int
    nk: int
    d: int


# The paper's sizes (§4, Fig. 2, Table 2g; §6 for 2D): query/key counts after sub-sampling.
PAPER_SIZES: tuple[Size, ...] = (
    Size("res4, 32-frame clip (4·14·14 → 4·7·7), d=512", 8, 784, 196, 512),
    Size("res3, 32-frame clip (4·28·28 → 4·14·14), d=256", 2, 3136, 784, 256),
    Size("res3, 128-frame clip (16·28·28 → 16·14·14), d=256", 1, 12544, 3136, 256),
    Size("res3, 128-frame clip, no sub-sampling, d=256", 1, 12544, 12544, 256),
    Size("2D map 128×256 (→ 64×128), d=256", 1, 32768, 8192, 256),
)
QUICK_SIZES: tuple[Size, ...] = (Size("quick: 1024 × 256, d=64", 1, 1024, 256, 64),)
PEER_CONCAT_SIZE = Size("res4, 32-frame clip (4·14·14 → 4·7·7), d=512", 1, 784, 196, 512)


# -- measurement (runs in a child process) -------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _heap_in_use() -> Callable[[], int] | None:
    """Bytes glibc's malloc has handed out and not got back (``mallinfo2``: in-use heap chunks +
    mapped blocks), or None where there is no ``mallinfo2`` (not glibc, or glibc < 2.33)."""
    from nlnet.engine.memory import glibc

    fn = getattr(glibc(), "mallinfo2", None)
    if fn is None:
        return None
    fn.restype = _MallInfo2

    def in_use() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)

    return in_use


class LiveHeapPeak:
    """The peak of :func:`_heap_in_use` above its value at entry, sampled every ``interval`` s
    by a thread while the block runs (PyTorch releases the GIL inside its operators).

    This is the CPU analogue of ``torch.cuda.max_memory_allocated``: what the tensors and
    everything else alive take, whatever the allocator keeps besides (peak RSS also counts the
    freed heap memory glibc keeps resident).  ``mib`` is None where it cannot be measured.
    """

    def __init__(self, interval: float = 5e-4) -> None:
        self.interval, self.mib = interval, None
        self._in_use = _heap_in_use()
        self._stop = threading.Event()

    def __enter__(self) -> LiveHeapPeak:
        if self._in_use is not None:
            self._base = self._peak = self._in_use()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    @property
    def peak_mib(self) -> float | None:
        """The peak above the entry value seen so far (None where it cannot be measured)."""
        if self._in_use is None or not hasattr(self, "_base"):
            return None
        return (self._peak - self._base) / 2**20

    def _sample(self) -> None:
        assert self._in_use is not None
        while not self._stop.is_set():
            self._peak = max(self._peak, self._in_use())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        if self._in_use is None:
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._in_use())
        self.mib = self.peak_mib


def peer_concatenation(theta: Any, phi: Any, g: Any, w: Any) -> Any:
    """Concatenation as the peers build it: the (B, 2d, Nq, Nk) pair tensor, a 1×1 conv, ReLU."""
    import torch

    b, nq, d = theta.shape
    nk = phi.shape[1]
    pair = torch.cat(
        [
            theta.transpose(1, 2)[:, :, :, None].expand(b, d, nq, nk),
            phi.transpose(1, 2)[:, :, None, :].expand(b, d, nq, nk),
        ],
        dim=1,
    )
    f = torch.relu(torch.nn.functional.conv2d(pair, w.view(1, 2 * d, 1, 1)))[:, 0]
    return torch.bmm(f / nk, g)


def measure(
    size: Size, form: str, backend: str, mode: str, repeats: int, device: str
) -> dict[str, Any]:
    """Time (median ms) and peak memory (MiB) of one case; call in a fresh process."""
    import torch

    from nlnet.ops import nonlocal_attention

    gen = torch.Generator(device=device).manual_seed(0)
    grad = mode == "fwd+bwd"

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen, device=device).requires_grad_(grad)

    theta, phi, g = (
        rand(size.b, size.nq, size.d),
        rand(size.b, size.nk, size.d),
        rand(size.b, size.nk, size.d),
    )
    w = rand(2 * size.d) if form == "concatenation" else None

    def run() -> None:
        if backend == "peers":
            y = peer_concatenation(theta, phi, g, w)
        else:
            y = nonlocal_attention(theta, phi, g, pairwise=form, concat_weight=w, backend=backend)
        if grad:
            y.backward(torch.ones_like(y))
            for t in (theta, phi, g, w):
                if t is not None:
                    t.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.set_grad_enabled(grad):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            base = _rss_kib("VmRSS") * 1024
        t0 = time.perf_counter()
        run()  # the warm-up run is also the cold-memory run
        first = time.perf_counter() - t0
        if device == "cuda":
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = _rss_kib("VmHWM") * 1024 - base
        times = []
        n = repeats if first < 2.0 else max(2, repeats // 2)  # fewer repeats for slow cases
        for _ in range(n):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return {"ms": 1e3 * statistics.median(times), "mib": peak / 2**20, "n": n}


def _child(queue: Any, fn: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> None:
    try:
        queue.put(fn(*args))
    except Exception as e:  # reported in the table, e.g. out of memory
        queue.put({"error": f"{type(e).__name__}: {e}"[:200]})


def in_fresh_process(
    fn: Callable[..., dict[str, Any]], args: tuple[Any, ...], preload: list[str], timeout: float
) -> dict[str, Any]:
    """``fn(*args)`` in a fresh child process, forked from a server that has imported
    ``preload`` and done nothing else (fast start, no OpenMP state, no allocations inherited
    from earlier cases).  A child that dies gives an ``error`` entry instead of a result."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args))
    proc.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception:
        result = {"error": "no result (killed, probably out of memory)"}
    proc.join()
    return result


def run_case(
    size: Size, form: str, backend: str, mode: str, repeats: int, device: str
) -> dict[str, Any]:
    """Measure one case in a fresh child process (:func:`in_fresh_process`)."""
    return in_fresh_process(
        measure, (size, form, backend, mode, repeats, device), ["torch", "nlnet.ops"], 1800
    )


# -- the table ---------------------------------------------------------------------------------
def gflops(size: Size, mode: str) -> float:
    fwd = 4.0 * size.b * size.nq * size.nk * size.d
    return (3.0 if mode == "fwd+bwd" else 1.0) * fwd / 1e9


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def benchmark(
    sizes: tuple[Size, ...],
    forms: tuple[str, ...],
    *,
    repeats: int,
    device: str,
    peers: bool,
) -> list[dict[str, Any]]:
    cases = [(size, form, mode) for size in sizes for form in forms for mode in ("fwd", "fwd+bwd")]
    rows = []
    for size, form, mode in tqdm(cases, desc="nlnet bench", unit="case", file=sys.stderr):
        row: dict[str, Any] = {"size": asdict(size), "form": form, "mode": mode}
        for backend in ("explicit", "auto"):
            row[backend] = run_case(size, form, backend, mode, repeats, device)
        rows.append(row)
    if peers and "concatenation" in forms:
        for mode in ("fwd", "fwd+bwd"):
            row = {"size": asdict(PEER_CONCAT_SIZE), "form": "concatenation", "mode": mode}
            for backend in ("peers", "auto"):
                row[backend] = run_case(
                    PEER_CONCAT_SIZE, "concatenation", backend, mode, repeats, device
                )
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| size | B | Nq × Nk | form | pass | reference ms | auto ms | time ratio | "
        "reference MiB | auto MiB | memory ratio | auto GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = Size(**row["size"])
        ref_name = "peers" if "peers" in row else "explicit"
        ref, auto = row[ref_name], row["auto"]
        ok = "error" not in ref and "error" not in auto
        t_ratio = auto["ms"] / ref["ms"] if ok else None
        m_ratio = auto["mib"] / ref["mib"] if ok and ref["mib"] > 0 else None
        gf = gflops(s, row["mode"]) / (auto["ms"] / 1e3) if "error" not in auto else None
        gf_txt = _fmt(gf, ".0f") if row["form"] in ("gaussian", "embedded_gaussian") else "—"
        form = row["form"] + (" (vs peers' pair tensor)" if ref_name == "peers" else "")
        lines.append(
            f"| {s.name} | {s.b} | {s.nq} × {s.nk} | {form} | {row['mode']} | "
            f"{_fmt(ref.get('ms'), '.1f')} | {_fmt(auto.get('ms'), '.1f')} | {_fmt(t_ratio, '.3f')} | "
            f"{_fmt(ref.get('mib'), '.0f')} | {_fmt(auto.get('mib'), '.0f')} | {_fmt(m_ratio, '.3f')} | "
            f"{gf_txt} |"
        )
        for name in (ref_name, "auto"):
            if "error" in row[name]:
                lines.append(f"|  | | | {name} failed: {row[name]['error']} | | | | | | | | |")
    return "\n".join(lines)


TARGETS = (  # issue 2: at 12544 × 12544, d = 256, B = 1, forward+backward, float32
    ("embedded_gaussian", "time", 1.0),
    ("embedded_gaussian", "memory", 0.10),
    ("dot_product", "time", 0.05),
    ("concatenation", "time", 0.10),
    ("concatenation", "memory", 0.15),
)


def target_report(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        s = row["size"]
        if (s["nq"], s["nk"], s["b"]) != (12544, 12544, 1) or row["mode"] != "fwd+bwd":
            continue
        if "peers" in row or "error" in row["explicit"] or "error" in row["auto"]:
            continue
        for form, what, limit in TARGETS:
            if row["form"] != form:
                continue
            key = "ms" if what == "time" else "mib"
            ratio = row["auto"][key] / row["explicit"][key]
            verdict = "met" if ratio <= limit else "MISSED"
            lines.append(
                f"- {form} {what}: auto/explicit = {ratio:.3f} (target ≤ {limit}) — {verdict}"
            )
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="one small size (< 30 s)")
    parser.add_argument(
        "--forms", nargs="+", choices=FORMS, default=list(FORMS), help="pairwise forms to run"
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=int,
        metavar="I",
        help=f"indices into the paper's sizes (0–{len(PAPER_SIZES) - 1}); default all",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs after the warm-up")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--no-peers", action="store_true", help="skip the peers' concatenation")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results here")
    model = parser.add_argument_group(
        "whole model (--model): nlnet's default network against the plain one"
    )
    model.add_argument("--model", help="e.g. i3d_r50_nl5: time the whole network instead")
    model.add_argument("--frames", type=int, nargs="+", help="clip lengths (default 8 32)")
    model.add_argument("--size", type=int, default=224, help="crop size (default 224)")
    model.add_argument("--eval-only", action="store_true", help="skip the training step")
    model.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    model.add_argument(
        "--bf16",
        action="store_true",
        help="also the default eval under bf16 autocast (vs the plain float32 network)",
    )
    model.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or process CPU time (use with --threads 1 on a shared machine)",
    )
    model.add_argument("--threads", type=int, help="torch threads (default: torch's)")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.model:
        return run_model(args)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    if args.quick:
        sizes = QUICK_SIZES
    elif args.sizes:
        bad = [i for i in args.sizes if not 0 <= i < len(PAPER_SIZES)]
        if bad:
            print(
                f"--sizes: unknown index {bad}; expected 0–{len(PAPER_SIZES) - 1}", file=sys.stderr
            )
            return 2
        sizes = tuple(PAPER_SIZES[i] for i in args.sizes)
    else:
        sizes = PAPER_SIZES
    repeats = args.repeats or (2 if args.quick else 5)
    peers = not args.no_peers and not args.quick
    print(
        f"# nlnet bench: torch {torch.__version__}, device {args.device}, "
        f"{torch.get_num_threads()} threads, float32, {os.cpu_count()} CPUs; median of "
        f"{repeats} runs after a warm-up (fewer when a run takes > 2 s); each case in a fresh process\n"
    )
    rows = benchmark(sizes, tuple(args.forms), repeats=repeats, device=args.device, peers=peers)
    print(markdown(rows))
    report = target_report(rows)
    if report:
        print("\nTargets (issue 2, 12544 × 12544, fwd+bwd):\n" + report)
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1))
    return 0


# -- whole model: nlnet's default against the plain network (``nlnet bench --model``) -----------
MODEL_TARGETS = (  # issue 11, item 1: default / plain, batch 1, 224², float32
    ("eval", 32, "time", 0.75),
    ("eval", 8, "time", 0.90),
    ("train", 32, "time", 0.85),
    ("train", 32, "memory", 0.60),
)


def _model_pair(name: str, frames: int, size: int, mode: str) -> tuple[Any, Any, Any]:
    """nlnet's default network and the plain one (explicit NL backend, no fast path), same weights.

    BN statistics and affine parameters are randomised (the freshly initialised ones are the
    identity, which would hide folding errors).
    """
    import torch

    from nlnet.models import create_model

    torch.manual_seed(0)
    default = create_model(name)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in default.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
    plain = create_model(name, backend="explicit")
    plain.load_state_dict(default.state_dict())
    plain.fast_inference = False
    plain.lean_training = False  # the plain autograd graph: every activation kept
    train = mode.startswith("train")
    default.train(train)
    plain.train(train)
    if mode == "train" and _training_defaults()[1]:
        from nlnet.engine.runtime import to_channels_last

        to_channels_last(default)  # as nlnet train lays it out (train.memory_format=auto)
    x = torch.randn(1, 3, frames, size, size, generator=gen)
    return default, plain, x


def _training_defaults() -> tuple[str, bool]:
    """``nlnet train``'s precision and channels-last choice on this CPU (``train.amp=auto``)."""
    import torch

    from nlnet.config import Config
    from nlnet.engine.runtime import channels_last, precision

    cfg, cpu = Config(), torch.device("cpu")
    return precision(cfg.train.amp, cpu, training=True), channels_last(cfg, cpu)


def _train_step(model: Any, x: Any, amp: str = "none") -> None:
    import torch

    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        y = model(x)
    y.float().logsumexp(1).sum().backward()


def _default_train_step(model: Any, x: Any, amp: str = "none", release: bool = True) -> None:
    """:func:`_train_step` with ``nlnet train``'s CPU memory policy (``train.release_memory``:
    freed blocks of 4 MiB and more go back to the system where PyTorch uses huge pages); glibc's
    thresholds are left at their dynamic ceiling afterwards, for the plain network's step."""
    from nlnet.engine.memory import release_freed_memory

    with release_freed_memory(release):
        _train_step(model, x, amp)


def _eval_step(model: Any, x: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(x)


def _eval_step_bf16(model: Any, x: Any) -> Any:
    import torch

    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16):
        return model(x)


def _steps(mode: str) -> tuple[Callable[[Any, Any], Any], Callable[[Any, Any], Any]]:
    """(default's step, plain's step) of a benchmark mode.

    ``train``: nlnet train's defaults (bf16 autocast where the CPU has it) against the plain
    float32 network; ``train-fp32``: both float32 (only the NL backend differs); ``eval-bf16``:
    the default under bf16 autocast against the plain float32 network; ``eval``: both float32.
    """
    if mode.startswith("train"):
        from nlnet.config import Config

        amp = _training_defaults()[0] if mode == "train" else "none"
        release = Config().train.release_memory  # resolved here, not in the timed step
        return partial(_default_train_step, amp=amp, release=release), _train_step
    if mode == "eval-bf16":
        return _eval_step_bf16, _eval_step
    return _eval_step, _eval_step


def compare_model_times(
    name: str, frames: int, size: int, mode: str, repeats: int, clock: str = "wall"
) -> dict[str, Any]:
    """Default vs plain, interleaved in this process: the fastest of ``repeats`` rounds of each.

    ``clock="cpu"`` measures process CPU time (with one thread: robust on a shared machine).
    Eval also gives the relative error of the default's logits against the plain network's.
    """
    import torch

    from nlnet.engine.threads import choose_threads

    default, plain, x = _model_pair(name, frames, size, mode)
    now = time.process_time if clock == "cpu" else time.perf_counter
    steps = _steps(mode)
    out: dict[str, Any] = {}
    a, b = steps[0](default, x), steps[1](plain, x)
    if not mode.startswith("train"):
        out["rel_err"] = float((a.float() - b).norm() / b.norm())
    cores = torch.get_num_threads()
    threads = [cores, cores]
    if mode == "train" and cores > 1 and clock == "wall":  # as nlnet train does (train.threads)
        threads[0] = choose_threads(lambda: steps[0](default, x), [cores, 1], repeats=2).threads
    best = [float("inf"), float("inf")]
    try:
        for _ in range(repeats):
            for i, model in enumerate((default, plain)):
                torch.set_num_threads(threads[i])
                t0 = now()
                steps[i](model, x)
                best[i] = min(best[i], now() - t0)
    finally:
        torch.set_num_threads(cores)
    out.update(default_s=best[0], plain_s=best[1], threads=cores, default_threads=threads[0])
    return out


def _model_peak(name: str, frames: int, size: int, mode: str, which: str) -> dict[str, Any]:
    """Peak RSS increase of the first step over the process once the network and clip exist.

    Call in a fresh process: the first step is measured because later ones reuse memory the
    allocator kept (their RSS increase is about 0).  It includes the gradients' allocation
    (training) and the folded/packed weights (the default's eval), as a user's first step does.
    """
    pair = _model_pair(name, frames, size, mode)
    model, x = pair[0 if which == "default" else 1], pair[2]
    del pair  # keep only the measured network
    step = _steps(mode)[0 if which == "default" else 1]
    _reset_peak_rss()
    base = _rss_kib("VmRSS") * 1024
    with LiveHeapPeak() as live:
        step(model, x)
    return {"mib": (_rss_kib("VmHWM") * 1024 - base) / 2**20, "live_mib": live.mib}


def model_peak(name: str, frames: int, size: int, mode: str, which: str) -> dict[str, Any]:
    """:func:`_model_peak` in a fresh child process (:func:`in_fresh_process`)."""
    return in_fresh_process(
        _model_peak, (name, frames, size, mode, which), ["torch", "nlnet.models"], 3600
    )


def model_benchmark(
    name: str,
    frames: tuple[int, ...],
    size: int,
    *,
    modes: tuple[str, ...] = ("eval", "train"),
    repeats: int = 3,
    clock: str = "wall",
    memory: bool = True,
) -> list[dict[str, Any]]:
    rows = []
    cases = [(f, m) for f in frames for m in modes]
    for f, mode in tqdm(cases, desc=f"nlnet bench --model {name}", unit="case", file=sys.stderr):
        row: dict[str, Any] = {"frames": f, "mode": mode}
        row.update(compare_model_times(name, f, size, mode, repeats, clock))
        if memory:
            for which in ("default", "plain"):
                peak = model_peak(name, f, size, mode, which)
                row[f"{which}_mib"] = peak.get("mib")
                row[f"{which}_live_mib"] = peak.get("live_mib")
        rows.append(row)
    return rows


def model_markdown(rows: list[dict[str, Any]], size: int) -> str:
    lines = [
        "| frames | pass | threads plain/default | plain s | default s | time ratio | plain MiB | "
        "default MiB | memory ratio | live heap ratio | output rel. error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    for r in rows:
        ratio = r["default_s"] / r["plain_s"]
        pm, dm = r.get("plain_mib"), r.get("default_mib")
        m_ratio = _ratio(dm, pm)
        live = _ratio(r.get("default_live_mib"), r.get("plain_live_mib"))
        err = _fmt(r.get("rel_err"), ".1e")
        lines.append(
            f"| {r['frames']}×{size}² | {r['mode']} | {r.get('threads', '?')}/"
            f"{r.get('default_threads', r.get('threads', '?'))} | {r['plain_s']:.3f} | "
            f"{r['default_s']:.3f} | "
            f"{ratio:.3f} | {_fmt(pm, '.0f')} | {_fmt(dm, '.0f')} | {_fmt(m_ratio, '.3f')} | "
            f"{_fmt(live, '.3f')} | {err} |"
        )
    return "\n".join(lines)


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def model_target_report(rows: list[dict[str, Any]], size: int = 224) -> tuple[str, bool]:
    """The issue-11 targets (at 224²; other sizes are reported, not judged) and whether all hold."""
    lines, all_met = [], True
    if size != 224:
        rows = []
    for mode, frames, what, limit in MODEL_TARGETS:
        for r in rows:
            if (r["mode"], r["frames"]) != (mode, frames):
                continue
            if what == "time":
                measured = [("time", r["default_s"] / r["plain_s"])]
            else:  # both the live heap (where glibc reports it) and the peak RSS
                measured = [
                    (label, ratio)
                    for label, ratio in (
                        (
                            "memory (live heap)",
                            _ratio(r.get("default_live_mib"), r.get("plain_live_mib")),
                        ),
                        ("memory (peak RSS)", _ratio(r.get("default_mib"), r.get("plain_mib"))),
                    )
                    if ratio is not None
                ]
            for label, ratio in measured:
                ok = ratio <= limit
                all_met &= ok
                lines.append(
                    f"- {mode} {frames} frames {label}: default/plain = {ratio:.3f} "
                    f"(target ≤ {limit}) — {'met' if ok else 'MISSED'}"
                )
        for r in rows:
            if r["mode"] == "eval" and r.get("rel_err", 0.0) > 1e-5:
                all_met = False
    errs = [r["rel_err"] for r in rows if r["mode"] == "eval"]
    if errs:
        ok = max(errs) <= 1e-5
        lines.append(
            f"- eval outputs: max relative error {max(errs):.1e} (target ≤ 1e-5)"
            f" — {'met' if ok else 'MISSED'}"
        )
    return "\n".join(lines), all_met


def run_model(args: argparse.Namespace) -> int:
    import torch

    if args.device != "cpu":
        print(f"--model runs on the CPU only, got --device {args.device}", file=sys.stderr)
        return 2

    if args.threads:
        torch.set_num_threads(args.threads)
    frames = tuple(args.frames or (8, 32))
    repeats = args.repeats or 3
    modes = ("eval",) if args.eval_only else ("eval", "train", "train-fp32")
    if args.bf16:
        modes += ("eval-bf16",)
    amp, cl = _training_defaults()
    amp_note = ("float32" if amp == "none" else f"{amp} autocast") + (
        ", channels-last" if cl else ""
    )
    print(
        f"# nlnet bench --model {args.model}: torch {torch.__version__}, cpu, "
        f"{torch.get_num_threads()} threads, float32, batch 1, {args.size}²; time = fastest of "
        f"{repeats} interleaved rounds ({args.clock} clock); memory = peak RSS increase of one "
        "step, each network in a fresh process; live heap = peak of the bytes malloc has handed "
        "out in that step (glibc mallinfo2, sampled every 0.5 ms: without the freed memory glibc "
        "keeps resident, like torch.cuda.max_memory_allocated on a GPU); both are judged. "
        "default = create_model(name); plain = "
        "backend='explicit', fast_inference=False, lean_training=False (the peers' way). train: "
        f"the default with nlnet train's defaults here ({amp_note}; its thread count measured "
        "between all cores and 1, as train.threads=0 does; its freed memory released as "
        "train.release_memory does); train-fp32: both in float32\n"
    )
    rows = model_benchmark(
        args.model,
        frames,
        args.size,
        modes=modes,
        repeats=repeats,
        clock=args.clock,
        memory=not args.no_memory,
    )
    print(model_markdown(rows, args.size))
    report, all_met = model_target_report(rows, args.size)
    if report:
        print("\nTargets (issue 11, item 1):\n" + report)
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1))
    return 0 if all_met else 1
