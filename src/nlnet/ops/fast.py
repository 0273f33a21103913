"""Exact non-local operation without the (Nq × Nk) matrix (``backend="auto"``).

* Softmax forms (Eq. 2–3): PyTorch's fused ``scaled_dot_product_attention`` (flash /
  memory-efficient kernels on CPU and CUDA), which never materialises the affinity; on CPU, when
  gradients are needed, a FlashAttention-2-style autograd Function: the forward keeps the row
  log-sum-exp and, within a memory budget (``SCORE_CACHE_BYTES``, 1 GiB by default), the
  unnormalised weights of its tiles; the backward recomputes the rest of the affinity in tiles
  of query rows with plain matmuls (the fused kernel's CPU backward is slow), and the tiles are
  shared dynamically by one-thread worker threads, so that other jobs on the machine slow it no
  more than they slow the explicit matrix.
* Dot product (Eq. 4): matrix products are associative, so (θφᵀ/N)·g = θ·(φᵀg)/N.  That is
  O(N·d·dv) instead of O(Nq·Nk·d) and needs only a d × dv intermediate.
* Concatenation (Eq. 5): w_fᵀ[θᵢ, φⱼ] = aᵢ + bⱼ.  With the keys sorted by bⱼ (descending), the keys
  where aᵢ + bⱼ > 0 are a prefix of that order whose length kᵢ one merged sort finds, so
  Σⱼ ReLU(aᵢ + bⱼ) gⱼ = aᵢ·G[kᵢ] + BG[kᵢ] with G, BG the prefix sums of g and b·g.
  O(N log N + N·dv), differentiable through autograd (sort and search only produce indices);
  in eager training a custom autograd Function gives the same gradients with O(N·dv) memory.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import weakref
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from nlnet.ops.pairwise import concat_projections, explicit_nonlocal, valid_key_count, widen

T = TypeVar("T")


def _autocast_off(t: Tensor) -> torch.autocast:
    return torch.autocast(device_type=t.device.type, enabled=False)


def is_tracing() -> bool:
    """True while torch.compile / torch.export / ONNX / TorchScript trace the code.

    Tracers see only the plain SDPA path (fused kernels, export-friendly); the hand-written
    autograd Function below is an eager-mode optimisation.
    """
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
    )


# -- softmax forms on CPU: blocked kernels on one-thread workers -------------------------------
#
# The affinity is processed one (nb, Nk) tile of query rows at a time.  Each tile costs a few
# large matrix products (the flops) and two or three elementwise passes; the tiles are handed out
# dynamically to worker threads that each run one-thread BLAS calls.  No OpenMP barrier separates
# the operations, so a core taken by another process slows only its own worker, while the other
# keeps taking tiles (with one parallel region per small op, every op waits for the slowest
# thread, which is what made the blocked kernels slow under load).

# Elements of one (nb, kb) tile of the affinity (nb query rows, kb keys): 1 Mi float32 = 4 MiB.
# Whole rows streamed from L3 are slow (one thread at Nk = 12544: 125 vs 150 GFLOP/s for 1 MiB
# tiles), but on the Intel Xeon (AMX, 2 MiB L2) 4 MiB tiles of up to 1024 rows measured 4–7%
# faster fwd+bwd than 1 MiB tiles of 256 rows, idle and beside a busy process (1×12544², d=256:
# 2.05 vs 2.18 s; 1×12544×3136: 0.53 vs 0.55 s; 1×6272², d=512: 1.02 vs 1.07 s): each key
# block's operands are re-read for 4× as many rows, and the products' packing is amortised.
TILE_ELEMENTS = 1 << 20
# Rows per tile at most (the rows are split into near-equal blocks, their count a multiple of
# the workers so that none waits at the end).
MAX_QUERY_BLOCK = 1024
# Tasks (blocks of rows) per worker at least, rows allowing (blocks of MIN_QUERY_BLOCK rows or
# more): when another process slows one worker, the others take over its share of the tasks
# (1×1568², d=512, with a busy process: two 784-row tasks took 1.18× the time of 256-row ones).
MIN_TASKS_PER_WORKER = 4
MIN_QUERY_BLOCK = 128
# B·Nq·Nk·d below which the kernels run on the calling thread only (thread hand-off ≈ 0.1 ms).
MIN_PARALLEL_WORK = 1 << 24
# Worker count override (tests); None: torch.get_num_threads() for large enough problems.
PARALLEL_WORKERS: int | None = None
# Bytes of attention weights the blocked forward may keep for the backward, all pending
# backwards of the process together (environment: NLNET_SCORE_CACHE_MIB; 0 keeps none).  A kept
# tile spares the backward one of its five products (7 → 6 per tile over fwd+bwd, the explicit
# matrix's count), which the recomputation cannot avoid: the products already run at a core's
# float32 peak.  Scores beyond the budget are recomputed; the explicit path would hold three
# such matrices.
SCORE_CACHE_ENV = "NLNET_SCORE_CACHE_MIB"


def _score_cache_bytes_from_env(value: str | None) -> int:
    """Bytes for ``SCORE_CACHE_BYTES`` from the environment's MiB (default 1024 per process)."""
    if value is None or not value.strip():
        return 1024 << 20
    try:
        mib = float(value)
    except ValueError:
        mib = float("nan")
    if not mib >= 0 or mib == float("inf"):
        raise ValueError(
            f"{SCORE_CACHE_ENV} must be a number of MiB >= 0 (0 keeps none), got {value!r}"
        )
    return int(mib * (1 << 20))


SCORE_CACHE_BYTES = _score_cache_bytes_from_env(os.environ.get(SCORE_CACHE_ENV))
# CPU training keeps PyTorch's fused SDPA kernel where it measured faster than the blocked
# kernels recomputing the scores: no mask, d = dv, at least one batch element per thread (its
# backward parallelises over the batch only) and Nq·Nk up to this many (2×6272×1568: ~10% less
# CPU time; 8×784×196: ~35%; at 1×12544×3136 its backward took 10× the blocked kernels' time),
# and only where the scores do not fit SCORE_CACHE_BYTES: the blocked kernels keeping them
# measured as fast or faster (AMD EPYC, fwd+bwd: 2×6272×1568 0.34 vs 0.36 s, 4×6272×1568 0.62
# vs 0.70 s, 8×3136×784 with d = 512 0.72 s both).
SDPA_TRAINING_MAX_AFFINITY = 1 << 24
# CPU training (float32/64) with B·Nq·Nk up to this many (16 MiB of float32 weights) uses plain
# products on the explicit matrix: at the paper's NL sizes with batch 1 they measured faster than
# both kernels (1×3136×784, d = 256: 1.36× faster than the blocked ones; 1×784×196, d = 512:
# 1.7×), and the matrix is small beside the network's activations.
EXPLICIT_TRAINING_MAX_AFFINITY = 1 << 22


def row_blocks(nq: int, *, batch: int = 1, workers: int = 1) -> int:
    """How many near-equal blocks the ``nq`` query rows are split into (each a task).

    Blocks of at most ``MAX_QUERY_BLOCK`` rows; with several ``workers``, at least
    ``MIN_TASKS_PER_WORKER`` tasks per worker over the ``batch`` elements (blocks of
    ``MIN_QUERY_BLOCK`` rows or more) and a multiple of ``workers`` tasks, where the rows allow.
    """
    n = -(-nq // max(1, min(nq, MAX_QUERY_BLOCK)))
    if workers > 1:
        enough = -(-MIN_TASKS_PER_WORKER * workers // batch)
        n = max(n, min(enough, nq // MIN_QUERY_BLOCK))
        while (batch * n) % workers and n < nq:
            n += 1
    return n


def tile_shape(
    nq: int, nk: int, tile_elements: int | None = None, *, batch: int = 1, workers: int = 1
) -> tuple[int, int]:
    """(rows nb, keys kb) of the largest tile: about ``tile_elements`` (default
    ``TILE_ELEMENTS``) elements; the rows split as :func:`row_blocks` says, the keys into
    near-equal blocks of kb (the last one shorter)."""
    budget = TILE_ELEMENTS if tile_elements is None else tile_elements
    nb = -(-nq // row_blocks(nq, batch=batch, workers=workers))
    kb = max(1, budget // nb)
    n_blocks = -(-nk // kb)
    kb = -(-nk // n_blocks)
    if kb >= 64:
        kb = min(nk, -(-kb // 16) * 16)  # whole SIMD panels
    return nb, kb


def _workers(work: int, tiles: int) -> int:
    """How many workers to use for ``tiles`` tiles of a problem of B·Nq·Nk·d = ``work``."""
    if PARALLEL_WORKERS is not None:
        return max(1, PARALLEL_WORKERS)
    if work < MIN_PARALLEL_WORK:
        return 1
    return max(1, min(torch.get_num_threads(), tiles))


class _WorkerPool:
    """Long-lived threads whose PyTorch ops run on one thread each (OpenMP and MKL).

    ``torch.set_num_threads`` is per thread for the OpenMP and MKL settings, but it also sets the
    process default that threads inherit on their first parallel op; the creating thread restores
    that default once the workers have set theirs, so nothing else sees a change.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(size)]
        n_main = torch.get_num_threads()  # initialises this thread's own settings first
        ready = threading.Barrier(size + 1)
        for q in self._queues:
            threading.Thread(
                target=self._loop, args=(q, ready), daemon=True, name="nlnet-softmax"
            ).start()
        ready.wait()
        torch.set_num_threads(n_main)

    @staticmethod
    def _loop(tasks: queue.SimpleQueue, ready: threading.Barrier) -> None:
        # PyTorch initialises a thread's settings from the process default on its first query
        # or parallel op (once); do that first, or it would later undo the one-thread setting.
        torch.get_num_threads()
        torch.set_num_threads(1)
        ready.wait()
        while True:
            fn, results = tasks.get()
            try:
                with torch.no_grad():  # grad mode is per thread; the kernels build no graph
                    results.put((True, fn()))
            except BaseException as e:  # re-raised in the calling thread
                results.put((False, e))
            del fn, results  # the task's closure (tensors, kept scores) is not ours to keep

    def run(self, fns: list[Callable[[], T]]) -> list[T]:
        """Run ``fns[w]`` on worker ``w`` (all at once) and return their results in order."""
        results: list[queue.SimpleQueue] = []
        for tasks, fn in zip(self._queues, fns):
            results.append(queue.SimpleQueue())
            tasks.put((fn, results[-1]))
        outcomes = [r.get() for r in results]
        for ok, value in outcomes:
            if not ok:
                raise value
        return [value for _, value in outcomes]


_POOL: _WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def _run_tiles(n_tiles: int, work: int, worker: Callable[[Callable[[], int]], T]) -> list[T]:
    """Call ``worker(next_tile)`` on each of the chosen workers; tiles go to whoever is free.

    ``next_tile()`` returns the next unclaimed tile index (≥ ``n_tiles`` when none is left).
    Under ``torch.use_deterministic_algorithms(True)`` worker w takes tiles w, w + n, … instead
    (the same partial sums every run, at the price of the balancing under load).
    """
    counter = itertools.count()  # next() on it is atomic under the GIL
    take = counter.__next__
    n = min(_workers(work, n_tiles), max(1, n_tiles))
    if n == 1:
        return [worker(take)]
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.size < n:
            _POOL = _WorkerPool(n)
        pool = _POOL
    if torch.are_deterministic_algorithms_enabled():
        takes = [itertools.chain(range(w, n_tiles, n), itertools.repeat(n_tiles)) for w in range(n)]
        return pool.run([lambda it=it: worker(it.__next__) for it in takes])
    return pool.run([lambda: worker(take) for _ in range(n)])


def _mask_bias(key_padding_mask: Tensor | None, like: Tensor) -> Tensor | None:
    """(B, Nk) bool padding mask → (B, Nk) additive bias: 0 for keys, -inf for padding."""
    if key_padding_mask is None:
        return None
    bias = torch.zeros(key_padding_mask.shape, dtype=like.dtype, device=like.device)
    return bias.masked_fill(key_padding_mask, float("-inf"))


def _tiles(batch: int, nq: int, workers: int) -> list[tuple[int, int, int]]:
    """The tasks (batch element, first row, end row): :func:`row_blocks` near-equal blocks of
    rows (sizes differing by one at most) in each batch element."""
    n = row_blocks(nq, batch=batch, workers=workers)
    return [(b, j * nq // n, (j + 1) * nq // n) for b in range(batch) for j in range(n)]


def _augment(x: Tensor, last: Tensor | float) -> Tensor:
    """[x, last] along the channels: (B, N, c) → (B, N, c + 1)."""
    y = x.new_empty(*x.shape[:-1], x.shape[-1] + 1)
    y[..., :-1] = x
    y[..., -1] = last
    return y


_CACHE_LOCK = threading.Lock()
_cache_live_bytes = 0


def score_cache_bytes() -> int:
    """Bytes of attention weights the blocked kernels keep now for pending backwards."""
    return _cache_live_bytes


def _release_cache_bytes(n: int) -> None:
    global _cache_live_bytes
    with _CACHE_LOCK:
        _cache_live_bytes -= n


def _reset_after_fork() -> None:
    """A forked child has neither the worker threads nor the parent's pending backwards."""
    global _POOL, _POOL_LOCK, _CACHE_LOCK, _cache_live_bytes
    _POOL, _POOL_LOCK = None, threading.Lock()
    _CACHE_LOCK, _cache_live_bytes = threading.Lock(), 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


class _ScoreCache:
    """The forward's unnormalised weights P̃ = exp(S − m) of its first ``len(weights)`` tasks.

    S = s·QKᵀ + bias, and m the running row maximum of the online softmax after the key block
    (``maxima[t][:, j]`` for block j; −inf where all keys so far are padding): the backward's
    P = exp(S − L) = P̃·exp(m − L) is then one multiplication, no exponential.  One tensor per
    (task, key block) tile, ≤ ``TILE_ELEMENTS`` (~4 MiB): the allocator reuses such blocks from
    one step to the next without page faults (a fresh 600 MiB buffer costs ~0.1 s of them).
    As many tasks are kept as ``SCORE_CACHE_BYTES`` allows beside the other pending backwards'
    weights; each tile's bytes count against it until the tile is freed (:meth:`release`).
    """

    def __init__(self, tiles: list[tuple[int, int, int]], kb: int, nk: int, like: Tensor) -> None:
        global _cache_live_bytes
        self.tiles, self.kb = tiles, kb
        item = like.element_size()
        n, total = 0, 0  # tasks kept, elements
        with _CACHE_LOCK:
            allowance = (SCORE_CACHE_BYTES - _cache_live_bytes) // item
            for _, r0, r1 in tiles:
                if total + (r1 - r0) * nk > allowance:
                    break
                n, total = n + 1, total + (r1 - r0) * nk
            _cache_live_bytes += total * item
        blocks = [(c0, min(c0 + kb, nk)) for c0 in range(0, nk, kb)]
        self.weights: list[list[Tensor]] = []
        pending = total * item  # reserved, not yet handed to a tile's finalizer
        try:
            for _, r0, r1 in tiles[:n]:
                self.weights.append([])
                for c0, c1 in blocks:
                    w = like.new_empty(r1 - r0, c1 - c0)
                    # the bytes return to the budget when the tile is freed
                    weakref.finalize(w, _release_cache_bytes, w.numel() * item)
                    pending -= w.numel() * item
                    self.weights[-1].append(w)
        finally:
            if pending:  # an allocation failed: give back what no tile holds
                _release_cache_bytes(pending)
        self.maxima = [like.new_empty(r1 - r0, len(blocks)) for _, r0, r1 in tiles[:n]]

    def tile(self, t: int, c0: int) -> tuple[Tensor, Tensor] | None:
        """Task ``t``'s tile of P̃ at key block ``c0`` and its (rows, 1) maxima, or None."""
        if t >= len(self.weights):
            return None
        j = c0 // self.kb
        return self.weights[t][j], self.maxima[t][:, j : j + 1]

    def release(self) -> None:
        """Free the kept weights (a backward after this recomputes them)."""
        self.weights, self.maxima = [], []


def _blocked_softmax_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    bias: Tensor | None,
    keep_scores: bool = False,
) -> tuple[Tensor, Tensor, _ScoreCache | None]:
    """softmax(scale·QKᵀ + bias)·V and its row log-sum-exp L, one (rows, keys) tile at a time.

    The online softmax: a block of rows keeps its running maximum m and accumulates
    Σⱼ exp(sᵢⱼ − mᵢ)·[vⱼ, 1] over the key blocks, rescaling by exp(m_old − m_new) when m grows,
    so exp never overflows; the row sums come out of the product as the extra channel.  With
    ``keep_scores`` the weights exp(S − m) of as many tasks as ``SCORE_CACHE_BYTES`` allows
    are kept for the backward (returned as a :class:`_ScoreCache`).
    """
    b, nq, d = q.shape
    nk, dv = k.shape[1], v.shape[2]
    out = q.new_empty(b, nq, dv)
    lse = q.new_empty(b, nq)
    v_aug = _augment(v, 1.0)
    workers = _workers(b * nq * nk * d, b * nq)
    nb, kb = tile_shape(nq, nk, batch=b, workers=workers)
    tiles = _tiles(b, nq, workers)
    cache = _ScoreCache(tiles, kb, nk, q) if keep_scores and SCORE_CACHE_BYTES > 0 else None

    def worker(next_tile: Callable[[], int]) -> None:
        buf, acc, q_buf = q.new_empty(nb * kb), q.new_empty(nb, dv + 1), q.new_empty(nb, d)
        while (t := next_tile()) < len(tiles):
            i, r0, r1 = tiles[t]
            rows = r1 - r0
            q_b, o = torch.mul(q[i, r0:r1], scale, out=q_buf[:rows]), acc[:rows]
            m = None
            for c0 in range(0, nk, kb):
                c1 = min(c0 + kb, nk)
                s = torch.mm(q_b, k[i, c0:c1].T, out=buf[: rows * (c1 - c0)].view(rows, -1))
                if bias is not None:
                    s.add_(bias[i, c0:c1])
                m_new = s.amax(dim=1, keepdim=True)
                if m is not None:
                    m_new = torch.maximum(m_new, m)
                shift = m_new
                if bias is not None:  # rows whose keys so far are all padding: m = −inf
                    shift = m_new.masked_fill(m_new == float("-inf"), 0.0)
                kept = cache.tile(t, c0) if cache is not None else None
                if kept is None:
                    p = s.sub_(shift).exp_()
                else:  # P̃ and m for the backward
                    p = torch.sub(s, shift, out=kept[0]).exp_()
                    kept[1].copy_(m_new)
                if m is None:
                    torch.mm(p, v_aug[i, c0:c1], out=o)
                else:  # exp(m_old − m_new) ≤ 1; 0 while m_old = −inf (o is still 0 then)
                    o.mul_(torch.exp(m - shift)).addmm_(p, v_aug[i, c0:c1])
                m = m_new
            assert m is not None
            denom = o[:, dv:]
            torch.div(o[:, :dv], denom, out=out[i, r0:r1])
            lse[i, r0:r1] = m.add_(denom.log())[:, 0]

    _run_tiles(len(tiles), b * nq * nk * d, worker)
    return out, lse, cache


def _blocked_softmax_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    bias: Tensor | None,
    grad_out: Tensor,
    scale: float,
    cache: _ScoreCache | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of softmax(scale·QKᵀ + bias)·V, recomputing P one (rows, keys) tile at a time.

    The FlashAttention-2 recurrence with D = rowsum(dY∘Y):  P = exp(s·QKᵀ + bias − L),
    dS = P∘(dY·Vᵀ − D),  dQ = s·dS·K,  dK = s·Σ dSᵀ·Q,  dV = Σ Pᵀ·dY.  The subtractions of L and
    D ride inside the products as an extra channel ([sQ, −L]·[K, 1]ᵀ, [dY, −D]·[V, 1]ᵀ), so a
    tile costs five products and two elementwise passes (exp, ∘).  A worker takes a block of
    rows at a time (so it alone writes those rows of dQ) and goes over the key blocks; each
    worker accumulates its own dK, dV, summed at the end.  Tiles whose scores the forward kept
    (``cache``, same tasks and key blocks) take P = exp(S − L) from them: four products.
    """
    b, nq, d = q.shape
    nk, d_v = k.shape[1], v.shape[2]
    k_aug = _augment(k, 1.0)
    v_aug = _augment(v, 1.0)
    k_s = k * scale
    dq = torch.empty_like(q)
    # a task: all key blocks of one block of rows (it owns dQ's rows)
    if cache is not None:  # the forward's tasks and key blocks, which the kept scores follow
        tiles, kb = cache.tiles, cache.kb
    else:
        workers = _workers(b * nq * nk * d, b * nq)
        _, kb = tile_shape(nq, nk, batch=b, workers=workers)
        tiles = _tiles(b, nq, workers)
    nb = max(r1 - r0 for _, r0, r1 in tiles)

    def worker(next_tile: Callable[[], int]) -> tuple[Tensor, Tensor]:
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        buf_p, buf_ds = q.new_empty(nb * kb), q.new_empty(nb * kb)
        qa_buf, dya_buf = q.new_empty(nb, d + 1), q.new_empty(nb, d_v + 1)
        while (t := next_tile()) < len(tiles):
            i, r0, r1 = tiles[t]
            rows = r1 - r0
            dy_b, dq_b = grad_out[i, r0:r1], dq[i, r0:r1]
            qa_b, dya_b = qa_buf[:rows], dya_buf[:rows]  # [sQ, −L], [dY, −D]
            qs_b = torch.mul(q[i, r0:r1], scale, out=qa_b[:, :d])
            torch.neg(lse[i, r0:r1], out=qa_b[:, d])
            dya_b[:, :d_v] = dy_b
            torch.neg(torch.linalg.vecdot(dy_b, out[i, r0:r1]), out=dya_b[:, d_v])  # D = Σ dY∘Y
            lse_b = lse[i, r0:r1, None]
            for c0 in range(0, nk, kb):
                c1 = min(c0 + kb, nk)
                shape = (rows, c1 - c0)
                p = buf_p[: shape[0] * shape[1]].view(shape)
                kept = cache.tile(t, c0) if cache is not None else None
                if kept is not None:  # P = P̃·exp(m − L); 0 where m = −inf (padding only)
                    torch.mul(kept[0], torch.sub(kept[1], lse_b).exp_(), out=p)
                else:
                    torch.mm(qa_b, k_aug[i, c0:c1].T, out=p)
                    if bias is not None:
                        p.add_(bias[i, c0:c1])
                    p.exp_()
                ds = torch.mm(dya_b, v_aug[i, c0:c1].T, out=buf_ds[: p.numel()].view(shape))
                ds.mul_(p)
                if c0 == 0:
                    torch.mm(ds, k_s[i, c0:c1], out=dq_b)
                else:
                    dq_b.addmm_(ds, k_s[i, c0:c1])
                dk[i, c0:c1].addmm_(ds.T, qs_b)
                dv[i, c0:c1].addmm_(p.T, dy_b)
        return dk, dv

    partial = _run_tiles(len(tiles), b * nq * nk * d, worker)
    dk, dv = partial[0]
    for dk_w, dv_w in partial[1:]:
        dk.add_(dk_w)
        dv.add_(dv_w)
    return dq, dk, dv


class _SoftmaxAttentionCPU(torch.autograd.Function):
    """softmax(scale·θφᵀ)·g (Eq. 2–3) with a memory-frugal, matmul-speed backward for CPUs.

    Forward: :func:`_blocked_softmax_forward`; (θ, φ, g, y, L) are saved, and the affinity
    scores as far as ``SCORE_CACHE_BYTES`` allows.  Backward: :func:`_blocked_softmax_backward`,
    which recomputes the scores it was not given, one tile at a time.  Exact (float64 gradcheck
    in the tests); beyond the kept scores it never holds more than a few (nb, Nk) tiles.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        scale: float,
        bias: Tensor | None,
        keep: bool,
    ) -> Tensor:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        with _autocast_off(q):
            out, lse, cache = _blocked_softmax_forward(q, k, v, scale, bias, keep_scores=keep)
        ctx.save_for_backward(q, k, v, out, lse, bias)
        ctx.scale, ctx.score_cache = scale, cache
        if cache is not None:
            # The weights live as long as the saved tensors: autograd frees those after the
            # backward (unless retain_graph), not when the graph goes (perhaps after the next
            # step's forward); under saved-tensor hooks that drop them (checkpointing) at once.
            weakref.finalize(lse, cache.release)
        return out

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor
    ) -> tuple[Tensor | None, ...]:
        q, k, v, out, lse, bias = ctx.saved_tensors
        cache = ctx.score_cache
        if cache is not None and not cache.weights:
            cache = None  # released: recompute
        with _autocast_off(q):
            dq, dk, dv = _blocked_softmax_backward(
                q, k, v, out, lse, bias, grad_out.contiguous(), ctx.scale, cache
            )
        return dq, dk, dv, None, None, None


def _pad_last(t: Tensor, size: int) -> Tensor:
    return t if t.shape[-1] == size else F.pad(t, (0, size - t.shape[-1]))


def softmax_attention(
    theta: Tensor,
    phi: Tensor,
    g: Tensor,
    *,
    scale: float,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """softmax(scale·θφᵀ)·g (Eq. 2–3), padded keys excluded; never three Nq × Nk matrices.

    * CPU, eager, gradients needed (float32/64), B·Nq·Nk ≤ ``EXPLICIT_TRAINING_MAX_AFFINITY``:
      plain products on the (small) weight matrix, the fastest there.
    * CPU, eager, gradients needed (float32/64), or d ≠ dv: :class:`_SoftmaxAttentionCPU`,
      the blocked kernels on worker threads (the fused CPU kernel needs d = dv and its backward
      is slow at large Nq·Nk or small batches); half-precision inputs are computed in float32
      there.  When training, the forward keeps the weights for the backward up to
      ``SCORE_CACHE_BYTES`` (all pending backwards together; one Nq × Nk matrix at most) and
      the backward recomputes the rest.  Training at sizes where the fused kernel measured
      faster (see ``SDPA_TRAINING_MAX_AFFINITY``) keeps it.
    * Otherwise (CUDA, inference, torch.compile/export): ``scaled_dot_product_attention``, the
      fused flash / memory-efficient kernels.  When d ≠ dv the narrower side is zero-padded,
      which changes neither θᵢᵀφⱼ nor y.
    """
    dtype = torch.promote_types(torch.promote_types(theta.dtype, phi.dtype), g.dtype)
    q, k, v = theta.to(dtype), phi.to(dtype), g.to(dtype)  # e.g. mixed inputs under autocast
    d, dv = q.shape[-1], v.shape[-1]
    if q.device.type == "cpu" and not is_tracing():
        wide = dtype in (torch.float32, torch.float64)
        needs_grad = torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad
        )
        sdpa_wins = (
            d == dv
            and key_padding_mask is None
            and q.shape[0] >= torch.get_num_threads()
            and q.shape[1] * k.shape[1] <= SDPA_TRAINING_MAX_AFFINITY
            and q.shape[0] * q.shape[1] * k.shape[1] * q.element_size() > SCORE_CACHE_BYTES
        )
        if (
            needs_grad
            and wide
            and q.shape[0] * q.shape[1] * k.shape[1] <= (EXPLICIT_TRAINING_MAX_AFFINITY)
        ):
            return explicit_nonlocal(
                q,
                k,
                v,
                pairwise="embedded_gaussian",
                scale=scale,
                key_padding_mask=key_padding_mask,
            )[0]
        if d != dv or (needs_grad and wide and not sdpa_wins):
            out_dtype = dtype
            if not wide:  # half inputs: compute the blocked path in float32 (no overflow)
                q, k, v = q.float(), k.float(), v.float()
            bias = _mask_bias(key_padding_mask, q)
            y = _SoftmaxAttentionCPU.apply(q, k, v, scale, bias, needs_grad)
            return y.to(out_dtype)
    attn_mask = None
    if key_padding_mask is not None:
        # SDPA's boolean mask is True where attention is *allowed*: (B, 1, 1, Nk) broadcasts.
        attn_mask = (~key_padding_mask)[:, None, None, :]
    width = max(d, dv)
    # Contiguous (B, 1, N, d) inputs: the fused kernels want them, and inductor's SDPA lowering
    # fails on the block's transposed views under dynamic shapes (torch 2.14).
    y = F.scaled_dot_product_attention(
        _pad_last(q, width)[:, None].contiguous(),
        _pad_last(k, width)[:, None].contiguous(),
        _pad_last(v, width)[:, None].contiguous(),
        attn_mask=attn_mask,
        scale=scale,
    )
    return y[:, 0, :, :dv]


def dot_product_attention(
    theta: Tensor,
    phi: Tensor,
    g: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """θ·(φᵀg)/N (Eq. 4, reassociated); computed in float32 or wider even under autocast."""
    nk = phi.shape[1]
    with _autocast_off(theta):
        theta_w, phi_w, g_w = widen(theta), widen(phi), widen(g)
        if key_padding_mask is not None:
            phi_w = phi_w.masked_fill(key_padding_mask[:, :, None], 0.0)
        n = valid_key_count(key_padding_mask, nk, theta_w)
        # Dividing φᵀg (d × dv) by N before the second product keeps its entries small.
        context = torch.bmm(phi_w.transpose(1, 2), g_w.to(phi_w.dtype)) / n
        y = torch.bmm(theta_w, context)
    return y.to(g.dtype)


def _count_below(c: Tensor, a: Tensor) -> Tensor:
    """kᵢ = #{j : cⱼ < aᵢ} per batch row, for (B, Nk) c and (B, Nq) a.

    Equivalent to ``searchsorted(sort(c), a)`` but built from a merged sort and a cumulative sum,
    which every exporter (ONNX included) supports.  Ties (aᵢ = cⱼ, i.e. aᵢ + bⱼ = 0) may land
    on either side: such a key contributes ReLU(0)·gⱼ = 0 either way.
    """
    nq = a.shape[1]
    order = torch.sort(torch.cat([a, c], dim=1), dim=1).indices
    is_key = (order >= nq).to(torch.int64)
    keys_before = torch.cumsum(is_key, dim=1) - is_key
    counts = torch.zeros_like(keys_before).scatter(1, order, keys_before)
    return counts[:, :nq]


def _sort_keys(
    a: Tensor, b: Tensor, key_padding_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Keys by descending b (padding last), and kᵢ = #{j : aᵢ + bⱼ > 0}."""
    sort_key = -b.detach()  # ascending in -b  <=>  descending in b
    if key_padding_mask is not None:
        # Padded keys sort last: +inf never satisfies c < a.
        sort_key = sort_key.masked_fill(key_padding_mask, float("inf"))
    c_sorted, order = torch.sort(sort_key, dim=1)
    # kᵢ = #{j : bⱼ > -aᵢ} = #{j : cⱼ < aᵢ} with c = -b sorted ascending.
    return order, _count_below(c_sorted, a.detach()), c_sorted


def _sorted_values(
    g: Tensor, b: Tensor, order: Tensor, key_padding_mask: Tensor | None, acc: torch.dtype
) -> tuple[Tensor, Tensor]:
    """g and b in the sorted key order, in the accumulation dtype, padded keys zeroed."""
    g_acc, b_acc = g.to(acc), b.to(acc)
    if key_padding_mask is not None:
        g_acc = g_acc.masked_fill(key_padding_mask[:, :, None], 0.0)
        b_acc = b_acc.masked_fill(key_padding_mask, 0.0)
    g_sorted = torch.gather(g_acc, 1, order[:, :, None].expand_as(g_acc))
    return g_sorted, torch.gather(b_acc, 1, order)


def _concat_prefix_sums(
    a: Tensor,
    b: Tensor,
    g: Tensor,
    n: Tensor,
    key_padding_mask: Tensor | None,
    acc: torch.dtype,
) -> Tensor:
    """yᵢ = (aᵢ·G[kᵢ] + BG[kᵢ]) / N, differentiable through autograd (tracing, inference)."""
    order, k, _ = _sort_keys(a, b, key_padding_mask)
    g_sorted, b_sorted = _sorted_values(g, b, order, key_padding_mask, acc)
    # Prefix sums with a leading zero row: G[k] = Σ_{r<k} g_(r).
    zeros = g_sorted.new_zeros(g_sorted.shape[0], 1, g_sorted.shape[2])
    prefix_g = torch.cat([zeros, torch.cumsum(g_sorted, dim=1)], dim=1)
    prefix_bg = torch.cat([zeros, torch.cumsum(b_sorted[:, :, None] * g_sorted, dim=1)], dim=1)
    idx = k[:, :, None].expand(-1, -1, g_sorted.shape[2])
    y = a.to(acc)[:, :, None] * torch.gather(prefix_g, 1, idx) + torch.gather(prefix_bg, 1, idx)
    return y / n.to(acc)


# Elements of one float64 (B, N, chunk) work buffer of the concatenation Function (8 MiB): it
# goes over g's channels in chunks so that its buffers stay a fraction of the (B, N, dv) tensors,
# in few enough passes that per-op overhead stays small.  None: chunk from this budget.
CONCAT_BUFFER_ELEMENTS = 1 << 20
CONCAT_CHANNEL_CHUNK: int | None = None


def _channel_chunk(batch: int, n: int) -> int:
    if CONCAT_CHANNEL_CHUNK is not None:
        return CONCAT_CHANNEL_CHUNK
    return max(16, CONCAT_BUFFER_ELEMENTS // max(1, batch * n))


def _sorted_chunk(
    g: Tensor, order: Tensor, key_padding_mask: Tensor | None, acc: torch.dtype, c0: int, c1: int
) -> Tensor:
    """Channels c0:c1 of g in the sorted key order, in the accumulation dtype, padding zeroed."""
    gc = g[:, :, c0:c1].to(acc)
    if key_padding_mask is not None:
        gc = gc.masked_fill(key_padding_mask[:, :, None], 0.0)
    return torch.gather(gc, 1, order[:, :, None].expand(-1, -1, c1 - c0))


class _ConcatPrefixSums(torch.autograd.Function):
    """Eq. (5) by prefix sums with an O(N·dv)-memory backward (eager mode, gradients needed).

    With keys sorted by descending b and kᵢ the number of keys with aᵢ + bⱼ > 0:
    yᵢ = (aᵢ·G[kᵢ] + BG[kᵢ]) / N.  Key r (sorted) receives the queries with kᵢ > r, so with
    S₀[r] = Σ_{kᵢ>r} dyᵢ and S₁[r] = Σ_{kᵢ>r} aᵢ·dyᵢ (suffix sums of per-k bins):
    ∂/∂aᵢ = dyᵢ·G[kᵢ] / N,  ∂/∂g_r = (S₁[r] + b_r·S₀[r]) / N,  ∂/∂b_r = S₀[r]·g_r / N.
    Only a, b, g, the sort order and k are saved; the sums are recomputed, a few channels at a
    time, in float64.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        a: Tensor,
        b: Tensor,
        g: Tensor,
        n: Tensor,
        key_padding_mask: Tensor | None,
        acc: torch.dtype,
    ) -> Tensor:
        order, k, _ = _sort_keys(a, b, key_padding_mask)
        b_acc = b.to(acc)
        if key_padding_mask is not None:
            b_acc = b_acc.masked_fill(key_padding_mask, 0.0)
        b_sorted = torch.gather(b_acc, 1, order)[:, :, None]
        a_acc, n_acc = a.to(acc)[:, :, None], n.to(acc)
        empty = (k == 0)[:, :, None]  # no key with aᵢ + bⱼ > 0
        kk = (k - 1).clamp_min(0)[:, :, None]
        bsz, nq, dv = g.shape[0], a.shape[1], g.shape[2]
        y = g.new_empty(bsz, nq, dv)
        chunk = _channel_chunk(bsz, max(nq, g.shape[1]))
        for c0 in range(0, dv, chunk):
            c1 = min(c0 + chunk, dv)
            g_sorted = _sorted_chunk(g, order, key_padding_mask, acc, c0, c1)
            prefix_bg = (b_sorted * g_sorted).cumsum_(dim=1)
            prefix_g = g_sorted.cumsum_(dim=1)
            idx = kk.expand(-1, -1, c1 - c0)
            yc = torch.gather(prefix_g, 1, idx).mul_(a_acc).add_(torch.gather(prefix_bg, 1, idx))
            y[:, :, c0:c1] = yc.masked_fill_(empty, 0.0).div_(n_acc)
        ctx.save_for_backward(a, b, g, n, order, k, key_padding_mask)
        ctx.acc = acc
        return y

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_y: Tensor
    ) -> tuple[Tensor | None, ...]:
        a, b, g, n, order, k, key_padding_mask = ctx.saved_tensors
        acc: torch.dtype = ctx.acc
        bsz, nk, dv = g.shape
        b_acc = b.to(acc)
        if key_padding_mask is not None:
            b_acc = b_acc.masked_fill(key_padding_mask, 0.0)
        b_sorted = torch.gather(b_acc, 1, order)[:, :, None]
        a_acc, n_acc = a.to(acc)[:, :, None], n.to(acc)
        empty = (k == 0)[:, :, None]
        kk = (k - 1).clamp_min(0)[:, :, None]
        grad_a = a_acc.new_zeros(a.shape)
        grad_b_sorted = a_acc.new_zeros(b.shape)
        grad_g = torch.empty_like(g)
        chunk = _channel_chunk(bsz, max(a.shape[1], nk))
        for c0 in range(0, dv, chunk):
            c1 = min(c0 + chunk, dv)
            width = c1 - c0
            dy = grad_y[:, :, c0:c1].to(acc) / n_acc  # a new tensor: modified in place below
            g_sorted = _sorted_chunk(g, order, key_padding_mask, acc, c0, c1)
            # ∂/∂aᵢ = dyᵢ·G[kᵢ]
            g_at_k = torch.gather(torch.cumsum(g_sorted, dim=1), 1, kk.expand(-1, -1, width))
            grad_a += torch.linalg.vecdot(g_at_k.masked_fill_(empty, 0.0), dy)
            del g_at_k
            # Bins by kᵢ, then S[r] = Σ_{s>r} bin[s] = total − Σ_{s≤r} bin[s].
            kidx = k[:, :, None].expand(-1, -1, width)
            s0 = dy.new_zeros(bsz, nk + 1, width).scatter_add_(1, kidx, dy).cumsum_(dim=1)
            s0 = s0[:, -1:] - s0[:, :nk]
            s1 = dy.new_zeros(bsz, nk + 1, width).scatter_add_(1, kidx, dy.mul_(a_acc))
            s1 = s1.cumsum_(dim=1)
            s1 = s1[:, -1:] - s1[:, :nk]
            grad_b_sorted += torch.linalg.vecdot(s0, g_sorted)
            grad_g_sorted = s1.add_(s0.mul_(b_sorted))
            del s0, g_sorted
            grad_g[:, :, c0:c1] = torch.empty_like(grad_g_sorted).scatter_(
                1, order[:, :, None].expand(-1, -1, width), grad_g_sorted
            )
        grad_b = torch.empty_like(grad_b_sorted).scatter_(1, order, grad_b_sorted)
        if key_padding_mask is not None:  # padded keys were zeroed: no gradient
            grad_g.masked_fill_(key_padding_mask[:, :, None], 0.0)
            grad_b.masked_fill_(key_padding_mask, 0.0)
        return grad_a.to(a.dtype), grad_b.to(b.dtype), grad_g, None, None, None


def concatenation_attention(
    theta: Tensor,
    phi: Tensor,
    g: Tensor,
    *,
    concat_weight: Tensor,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Σⱼ ReLU(aᵢ + bⱼ)·gⱼ / N (Eq. 5) by sorting keys and taking prefix sums.

    The prefix sums are accumulated in float64 (float32 inputs) so the result is at least as
    accurate as the explicit matrix product, which also sums Nk terms per output.
    """
    nk = phi.shape[1]
    out_dtype = g.dtype
    with _autocast_off(theta):
        theta_w, phi_w, g_w = widen(theta), widen(phi), widen(g)
        a, b = concat_projections(theta_w, phi_w, concat_weight)  # (B, Nq), (B, Nk)
        acc = torch.float64 if g.device.type != "mps" else torch.float32
        # aᵢ + bⱼ = (aᵢ + m) + (bⱼ − m): centring b on its mean keeps the prefix sums (and the
        # cancellation in aᵢ·G + BG) on the scale of the result when b has a large offset.
        valid = None if key_padding_mask is None else ~key_padding_mask
        if valid is None:
            m = b.detach().mean(dim=1, keepdim=True)
        else:
            m = (b.detach() * valid).sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True)
        a, b = a + m, b - m
        n = valid_key_count(key_padding_mask, nk, a)
        needs_grad = torch.is_grad_enabled() and (
            a.requires_grad or b.requires_grad or g_w.requires_grad
        )
        if needs_grad and not is_tracing():
            # Eager training: a hand-written backward that keeps only O(N) tensors.
            y = _ConcatPrefixSums.apply(a, b, g_w, n, key_padding_mask, acc)
        else:
            y = _concat_prefix_sums(a, b, g_w, n, key_padding_mask, acc)
    return y.to(out_dtype)
