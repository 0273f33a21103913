"""The non-local operation (§3.1–3.2, Eq. 1–5): both backends against a per-position loop."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from nlnet import nonlocal_attention
from nlnet.ops import PAIRWISE_FUNCTIONS, default_scale
from nlnet.ops import fast as fast_mod

FORMS = PAIRWISE_FUNCTIONS
F64 = torch.float64


def loop_reference(theta, phi, g, *, pairwise, scale=None, concat_weight=None, mask=None):
    """Eq. (1) one output position at a time, with f and C(x) written out as in §3.2."""
    b_, nq, d = theta.shape
    if scale is None:
        scale = d**-0.5 if pairwise == "embedded_gaussian" else 1.0
    out = torch.zeros(b_, nq, g.shape[2], dtype=F64)
    for b in range(b_):
        keys = [j for j in range(phi.shape[1]) if mask is None or not bool(mask[b, j])]
        n = len(keys)
        for i in range(nq):
            th = theta[b, i].to(F64)
            f = []
            for j in keys:
                ph = phi[b, j].to(F64)
                if pairwise in ("gaussian", "embedded_gaussian"):
                    f.append(scale * float(th @ ph))  # log f; exponentiated below
                elif pairwise == "dot_product":
                    f.append(float(th @ ph))
                else:
                    w = concat_weight.to(F64)
                    f.append(max(0.0, float(w @ torch.cat([th, ph]))))
            if pairwise in ("gaussian", "embedded_gaussian"):
                top = max(f)  # exp(s − max)/Σ exp(s − max) = exp(s)/Σ exp(s)
                e = [math.exp(v - top) for v in f]
                weights = [v / sum(e) for v in e]
            else:
                weights = [v / n for v in f]
            for w_ij, j in zip(weights, keys):
                out[b, i] += w_ij * g[b, j].to(F64)
    return out


def make_inputs(form, *, b=2, nq=7, nk=6, d=5, dv=4, dtype=F64, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(b, nq, d, generator=gen, dtype=dtype)
    phi = torch.randn(b, nk, d, generator=gen, dtype=dtype)
    g = torch.randn(b, nk, dv, generator=gen, dtype=dtype)
    w = torch.randn(2 * d, generator=gen, dtype=dtype) if form == "concatenation" else None
    tensors = [theta, phi, g] + ([w] if w is not None else [])
    for t in tensors:
        t.requires_grad_(grad)
    return theta, phi, g, w


def make_mask(b=2, nk=6):
    mask = torch.zeros(b, nk, dtype=torch.bool)
    mask[0, 1] = True
    mask[1, 3:] = True
    return mask


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_both_backends_match_per_position_loop(form, use_mask):
    theta, phi, g, w = make_inputs(form)
    mask = make_mask() if use_mask else None
    ref = loop_reference(theta, phi, g, pairwise=form, concat_weight=w, mask=mask)
    for backend in ("auto", "explicit"):
        y = nonlocal_attention(
            theta, phi, g, pairwise=form, concat_weight=w, key_padding_mask=mask, backend=backend
        )
        assert y.dtype == F64 and y.shape == (2, 7, 4)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("form", ["gaussian", "embedded_gaussian"])
def test_explicit_scale_is_used(form):
    theta, phi, g, _ = make_inputs(form)
    ref = loop_reference(theta, phi, g, pairwise=form, scale=0.37)
    for backend in ("auto", "explicit"):
        y = nonlocal_attention(theta, phi, g, pairwise=form, scale=0.37, backend=backend)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    assert default_scale("embedded_gaussian", 16) == 0.25
    assert default_scale("gaussian", 16) == 1.0


@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_return_attention_weights(form, use_mask):
    theta, phi, g, w = make_inputs(form)
    mask = make_mask() if use_mask else None
    y, weights = nonlocal_attention(
        theta, phi, g, pairwise=form, concat_weight=w, key_padding_mask=mask, return_attention=True
    )
    assert weights.shape == (2, 7, 6)
    torch.testing.assert_close(weights @ g, y)
    if mask is not None:
        assert bool((weights.masked_select(mask[:, None, :].expand_as(weights)) == 0).all())
    if form in ("gaussian", "embedded_gaussian"):
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 7, dtype=F64))


@pytest.mark.parametrize("backend", ["auto", "explicit"])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_gradcheck(form, use_mask, backend):
    theta, phi, g, w = make_inputs(form, b=2, nq=5, nk=6, d=3, dv=2, grad=True, seed=3)
    mask = make_mask() if use_mask else None

    def fn(*args):
        return nonlocal_attention(
            args[0],
            args[1],
            args[2],
            pairwise=form,
            concat_weight=args[3] if form == "concatenation" else None,
            key_padding_mask=mask,
            backend=backend,
        )

    inputs = (theta, phi, g) + ((w,) if w is not None else ())
    assert torch.autograd.gradcheck(fn, inputs)


def test_cpu_softmax_function_is_used_and_gradchecks():
    """The hand-written backward (CPU, grad needed) is exercised: d = dv and d ≠ dv."""
    calls = []
    orig = fast_mod._SoftmaxAttentionCPU.apply

    def spy(*args):
        calls.append(args[0].shape)
        return orig(*args)

    for dv in (5, 3):
        theta, phi, g, _ = make_inputs("embedded_gaussian", d=5, dv=dv, grad=True, seed=dv)
        mask = make_mask()
        fast_mod._SoftmaxAttentionCPU.apply = spy
        try:
            assert torch.autograd.gradcheck(
                lambda a, b, c, m=mask: nonlocal_attention(
                    a, b, c, pairwise="embedded_gaussian", key_padding_mask=m
                ),
                (theta, phi, g),
            )
        finally:
            fast_mod._SoftmaxAttentionCPU.apply = orig
    assert len(calls) > 0


def test_blocked_paths_with_several_query_blocks(monkeypatch):
    """Force tiny tiles so the blocked forward/backward loop over many query blocks."""
    monkeypatch.setattr(fast_mod, "TILE_ELEMENTS", 4)
    monkeypatch.setattr(fast_mod, "MAX_QUERY_BLOCK", 2)
    theta, phi, g, _ = make_inputs("gaussian", b=2, nq=9, nk=5, d=4, dv=3, grad=True)
    mask = make_mask(nk=5)
    assert fast_mod.tile_shape(9, 5) == (2, 2)  # 5 tiles of rows × 3 key blocks
    y = nonlocal_attention(theta, phi, g, pairwise="gaussian", key_padding_mask=mask)
    ref = loop_reference(theta.detach(), phi.detach(), g.detach(), pairwise="gaussian", mask=mask)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, b, c: nonlocal_attention(a, b, c, pairwise="gaussian", key_padding_mask=mask),
        (theta, phi, g),
    )
    with torch.no_grad():  # the no-grad blocked forward (d ≠ dv) too
        torch.testing.assert_close(
            nonlocal_attention(theta, phi, g, pairwise="gaussian", key_padding_mask=mask), ref
        )


# -- the blocked softmax kernels (CPU): tiles on one-thread workers ------------------------------
def test_row_blocks_give_every_worker_tasks(monkeypatch):
    """Rows split into near-equal blocks: at most MAX_QUERY_BLOCK rows, MIN_TASKS_PER_WORKER
    tasks per worker where blocks of MIN_QUERY_BLOCK rows allow, a multiple of the workers."""
    assert fast_mod.row_blocks(12544, workers=2) == 14  # 896 rows: 13 blocks of ≤1024, made even
    assert fast_mod.tile_shape(12544, 12544, batch=1, workers=2) == (896, 1152)
    assert fast_mod.row_blocks(1568, workers=2) == 8  # 196 rows: 4 tasks per worker
    assert fast_mod.row_blocks(200, workers=2) == 2  # one block of ≥128 rows, made even
    assert fast_mod.row_blocks(6272, batch=2, workers=2) == 7  # 14 tasks over the batch
    assert fast_mod.row_blocks(6272, batch=3, workers=2) == 8  # 24 tasks, even
    assert fast_mod.row_blocks(12544) == 13  # one worker: only the size cap
    monkeypatch.setattr(fast_mod, "MIN_QUERY_BLOCK", 1)
    for nq, batch, workers in [(37, 1, 3), (9, 2, 2), (5, 1, 4), (1, 1, 2), (130, 3, 2)]:
        n = fast_mod.row_blocks(nq, batch=batch, workers=workers)
        tiles = fast_mod._tiles(batch, nq, workers)
        assert len(tiles) == batch * n
        sizes = [r1 - r0 for _, r0, r1 in tiles]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
        assert max(sizes) == fast_mod.tile_shape(nq, 1, batch=batch, workers=workers)[0]
        assert batch * n >= min(fast_mod.MIN_TASKS_PER_WORKER * workers, batch * nq)
        if batch * n < batch * nq:
            assert (batch * n) % workers == 0
        for b in range(batch):  # the blocks cover the rows once, in order
            spans = [(r0, r1) for i, r0, r1 in tiles if i == b]
            assert spans[0][0] == 0 and spans[-1][1] == nq
            assert all(a[1] == c[0] for a, c in itertools.pairwise(spans))


def _explicit_and_auto_grads(form, tensors, mask, dy):
    out = {}
    for backend in ("explicit", "auto"):
        y = nonlocal_attention(*tensors, pairwise=form, key_padding_mask=mask, backend=backend)
        out[backend] = (y, *torch.autograd.grad(y, tensors, dy))
    return out


@pytest.mark.parametrize("kept", ["none", "some", "all"])
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("form", ["gaussian", "embedded_gaussian"])
def test_blocked_softmax_matches_explicit_float64(form, use_mask, workers, kept, monkeypatch):
    """Values and gradients equal the explicit matrix's: odd sizes (Nq not a multiple of the
    tile), batch 3, d ≠ dv, several workers sharing the tiles and summing their dK, dV; the
    backward recomputing all the weights, some (the rest kept by the forward), or none."""
    monkeypatch.setattr(fast_mod, "PARALLEL_WORKERS", workers)
    budget = {"none": 0, "some": 8 * 23 * 8 * 4, "all": 1 << 30}[kept]  # 4 of 15 tasks
    monkeypatch.setattr(fast_mod, "SCORE_CACHE_BYTES", budget)
    monkeypatch.setattr(fast_mod, "MAX_QUERY_BLOCK", 8)  # 37 rows = 3·7 + 2·8
    monkeypatch.setattr(fast_mod, "TILE_ELEMENTS", 8 * 7)
    assert fast_mod.tile_shape(37, 23) == (8, 6)  # 23 keys = 6 + 6 + 6 + 5
    gen = torch.Generator().manual_seed(4)
    b, nq, nk, d, dv = 3, 37, 23, 6, 5
    tensors = [
        torch.randn(b, nq, d, generator=gen, dtype=F64, requires_grad=True),
        torch.randn(b, nk, d, generator=gen, dtype=F64, requires_grad=True),
        torch.randn(b, nk, dv, generator=gen, dtype=F64, requires_grad=True),
    ]
    mask = None
    if use_mask:
        mask = torch.rand(b, nk, generator=gen) < 0.3
        mask[:, 0] = False  # at least one key per row
        mask[0, :12], mask[0, 20] = True, False  # whole leading key blocks of padding
    dy = torch.randn(b, nq, dv, generator=gen, dtype=F64)
    seen = []
    orig = fast_mod._blocked_softmax_backward
    monkeypatch.setattr(
        fast_mod,
        "_blocked_softmax_backward",
        lambda *a: seen.append(len(a[-1].weights) if a[-1] is not None else 0) or orig(*a),
    )
    res = _explicit_and_auto_grads(form, tensors, mask, dy)
    assert seen == [{"none": 0, "some": 4, "all": len(fast_mod._tiles(b, nq, workers))}[kept]]
    assert fast_mod.score_cache_bytes() == 0  # freed after the backward
    for a, e in zip(res["auto"], res["explicit"]):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    if mask is not None:  # padded keys get no gradient
        assert bool((res["auto"][2][mask] == 0).all()) and bool((res["auto"][3][mask] == 0).all())
    assert res["auto"][2].abs().sum() > 0


def test_blocked_softmax_very_negative_logits_after_padding(monkeypatch):
    """float32 logits near −200 (exp underflows) after whole key blocks of padding: the
    running maximum must not be reset to 0 by the padded blocks."""
    monkeypatch.setattr(fast_mod, "SDPA_TRAINING_MAX_AFFINITY", 0)  # the blocked kernels
    monkeypatch.setattr(fast_mod, "MAX_QUERY_BLOCK", 4)
    monkeypatch.setattr(fast_mod, "TILE_ELEMENTS", 4 * 4)  # 4-key blocks
    gen = torch.Generator().manual_seed(9)
    theta = -torch.ones(2, 6, 8) * 5 + 0.1 * torch.randn(2, 6, 8, generator=gen)
    phi = torch.ones(2, 12, 8) * 5 + 0.1 * torch.randn(2, 12, 8, generator=gen)
    g = torch.randn(2, 12, 3, generator=gen)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, :8] = True  # the first two key blocks of batch 0 are padding
    t = [x.requires_grad_() for x in (theta, phi, g)]
    dy = torch.randn(2, 6, 3, generator=gen)
    res = _explicit_and_auto_grads("gaussian", t, mask, dy)
    assert (theta @ phi.transpose(1, 2)).max() < -150
    # The reference: the explicit matrix in float64 on the same inputs.  Logits of ~200 put an
    # absolute float32 rounding of ~1e-5 into the blocked kernels' log-sum-exp, so their rows of
    # P sum to 1 ± 1e-5, and dθ = dS·φ (φ ≈ 5 everywhere: Σ_j dS_ij cancels) carries that error
    # times |φ|: a few 1e-4 relative, as in any flash-style kernel.  A running maximum reset to
    # 0 by the padded blocks would give inf/NaN or values off by orders of magnitude.
    t64 = [x.detach().double().requires_grad_() for x in t]
    ref = _explicit_and_auto_grads("gaussian", t64, mask, dy.double())["explicit"]
    for a, r in zip(res["auto"], ref):
        assert torch.isfinite(a).all()
        assert (a.double() - r).abs().max().item() <= 2e-3 * r.abs().max().item()


@pytest.mark.parametrize("budget", [0, 1 << 30])
def test_blocked_softmax_gradcheck_on_workers(budget, monkeypatch):
    """float64 gradcheck with the tiles spread over two workers (several tiles each), the
    weights recomputed or kept (gradcheck also runs the backward twice on one graph and wants
    the same bits: the kept weights stay while the graph is retained)."""
    monkeypatch.setattr(fast_mod, "SCORE_CACHE_BYTES", budget)
    monkeypatch.setattr(fast_mod, "SDPA_TRAINING_MAX_AFFINITY", 0)  # the blocked kernels
    monkeypatch.setattr(fast_mod, "PARALLEL_WORKERS", 2)
    monkeypatch.setattr(fast_mod, "MAX_QUERY_BLOCK", 4)
    monkeypatch.setattr(fast_mod, "TILE_ELEMENTS", 4 * 4)
    theta, phi, g, _ = make_inputs("embedded_gaussian", b=2, nq=9, nk=6, d=4, dv=4, grad=True)
    mask = make_mask()
    assert torch.autograd.gradcheck(
        lambda a, b, c: nonlocal_attention(
            a, b, c, pairwise="embedded_gaussian", key_padding_mask=mask
        ),
        (theta, phi, g),
        nondet_tol=1e-12,  # the workers' dK, dV partials are summed as the tiles fell to them
    )


def _blocked_inputs(b=2, nq=40, nk=30, d=8, seed=11):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(b, n, d, generator=gen, dtype=F64, requires_grad=True) for n in (nq, nk, nk)
    ]


def test_kept_weights_budget_is_shared_and_freed(monkeypatch):
    """The kept weights of all pending backwards stay within SCORE_CACHE_BYTES; the rest is
    recomputed (same gradients); a backward frees its call's weights, so does dropping the graph."""
    monkeypatch.setattr(fast_mod, "PARALLEL_WORKERS", 2)
    monkeypatch.setattr(fast_mod, "MAX_QUERY_BLOCK", 10)  # 8 tasks of 10 rows × 30 keys
    one_call = 2 * 40 * 30 * 8
    monkeypatch.setattr(fast_mod, "SCORE_CACHE_BYTES", one_call * 3 // 2)
    t = _blocked_inputs()
    ref = nonlocal_attention(*t, pairwise="embedded_gaussian", backend="explicit")
    ref_grads = torch.autograd.grad(ref.sum(), t)
    ys = [nonlocal_attention(*t, pairwise="embedded_gaussian") for _ in range(3)]
    assert fast_mod.score_cache_bytes() == one_call * 3 // 2  # all of one call, half the next
    for y in ys:
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for a, e in zip(torch.autograd.grad(ys[1].sum(), t), ref_grads):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    assert fast_mod.score_cache_bytes() == one_call  # the half-kept call's weights are freed
    del ys[0]
    assert fast_mod.score_cache_bytes() == 0  # the graph went without a backward
    y = nonlocal_attention(*t, pairwise="embedded_gaussian")
    assert fast_mod.score_cache_bytes() == one_call  # the budget is free again
    del y, ys
    assert fast_mod.score_cache_bytes() == 0


def test_kept_weights_retained_graph_and_checkpointing(monkeypatch):
    """retain_graph: the second backward uses the same kept weights and frees them (the same
    bits under deterministic algorithms, where the workers' tiles are fixed); non-reentrant
    checkpointing drops them at once and recomputes; no-grad keeps none."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setattr(fast_mod, "PARALLEL_WORKERS", 2)
    monkeypatch.setattr(fast_mod, "MAX_QUERY_BLOCK", 10)
    t = _blocked_inputs()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        y = nonlocal_attention(*t, pairwise="gaussian")
        assert fast_mod.score_cache_bytes() == 2 * 40 * 30 * 8
        first = torch.autograd.grad(y.sum(), t, retain_graph=True)
        assert fast_mod.score_cache_bytes() == 2 * 40 * 30 * 8
        second = torch.autograd.grad(y.sum(), t)
        assert fast_mod.score_cache_bytes() == 0
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        again = torch.autograd.grad(nonlocal_attention(*t, pairwise="gaussian").sum(), t)
        assert all(torch.equal(a, b) for a, b in zip(first, again))  # a new graph: same bits
    finally:
        torch.use_deterministic_algorithms(deterministic)

    def block(a, b, c):
        return nonlocal_attention(a, b, c, pairwise="gaussian")

    y = checkpoint(block, *t, use_reentrant=False)
    assert fast_mod.score_cache_bytes() == 0
    for a, e in zip(torch.autograd.grad(y.sum(), t), first):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    assert fast_mod.score_cache_bytes() == 0
    g = torch.randn(2, 30, 5, dtype=F64)  # d ≠ dv: the blocked kernels also without grad
    with torch.no_grad():
        nonlocal_attention(t[0], t[1], g, pairwise="gaussian")
        kept = fast_mod.score_cache_bytes()
    assert kept == 0


@pytest.mark.parametrize("form", ["gaussian", "embedded_gaussian"])
def test_blocked_softmax_float32_error_is_rounding(form):
    """float32: the blocked kernels are as close to the float64 truth as the explicit matrix
    (a few units of float32 rounding), on a size that uses the worker threads."""
    gen = torch.Generator().manual_seed(6)
    b, nq, nk, d = 2, 700, 500, 48
    work = b * nq * nk * d
    assert work >= fast_mod.MIN_PARALLEL_WORK  # the default path, workers included
    scale = 0.1 if form == "gaussian" else None  # logits of a few units: a peaked softmax
    x64 = [torch.randn(b, n, d, generator=gen, dtype=F64) for n in (nq, nk, nk)]
    dy = torch.randn(b, nq, d, generator=gen, dtype=F64)

    def run(backend, dtype):
        t = [x.to(dtype).requires_grad_() for x in x64]
        y = nonlocal_attention(*t, pairwise=form, scale=scale, backend=backend)
        return [y, *torch.autograd.grad(y, t, dy.to(dtype))]

    truth = run("explicit", F64)
    errs = {}
    for backend in ("explicit", "auto"):
        got = run(backend, torch.float32)
        errs[backend] = [
            ((x.double() - r).abs().max() / r.abs().max()).item() for x, r in zip(got, truth)
        ]
    for e_auto, e_ref in zip(errs["auto"], errs["explicit"]):
        assert e_auto < 1e-5 and e_auto <= 4 * e_ref + 1e-7, errs


def test_blocked_softmax_autocast_bf16_on_workers(monkeypatch):
    """Under bf16 autocast the softmax forms still run (in float32) through the workers."""
    monkeypatch.setattr(fast_mod, "SDPA_TRAINING_MAX_AFFINITY", 0)  # the blocked kernels
    monkeypatch.setattr(fast_mod, "PARALLEL_WORKERS", 2)
    gen = torch.Generator().manual_seed(8)
    t = [torch.randn(2, 130, 16, generator=gen, requires_grad=True) for _ in range(3)]
    ref = nonlocal_attention(*t, pairwise="embedded_gaussian", backend="explicit")
    ref_grads = torch.autograd.grad(ref.sum(), t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = nonlocal_attention(*(x.to(torch.bfloat16) for x in t), pairwise="gaussian")
        y32 = nonlocal_attention(*t, pairwise="embedded_gaussian")
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    grads = torch.autograd.grad(y32.float().sum(), t)
    torch.testing.assert_close(y32.float(), ref, rtol=1e-5, atol=1e-5)  # float32 inside
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_cpu_training_keeps_sdpa_where_it_wins(monkeypatch):
    """Small affinity, no mask, d = dv, a batch element per thread, scores beyond the blocked
    kernels' budget: the fused kernel (same values and gradients); otherwise the blocked
    kernels."""
    calls = []
    orig = fast_mod._SoftmaxAttentionCPU.apply
    monkeypatch.setattr(
        fast_mod._SoftmaxAttentionCPU, "apply", lambda *a: calls.append(1) or orig(*a)
    )
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    theta, phi, g, _ = make_inputs("embedded_gaussian", b=2, d=4, dv=4, grad=True)
    nonlocal_attention(theta, phi, g, pairwise="embedded_gaussian").sum().backward()
    assert calls  # 2 × 7 × 6 float64 scores fit SCORE_CACHE_BYTES: the blocked kernels
    monkeypatch.setattr(fast_mod, "SCORE_CACHE_BYTES", 2 * 7 * 6 * 8 - 1)
    for b, expect_blocked in ((2, False), (1, True)):
        calls.clear()
        theta, phi, g, _ = make_inputs("embedded_gaussian", b=b, d=4, dv=4, grad=True)
        res = _explicit_and_auto_grads(
            "embedded_gaussian", [theta, phi, g], None, torch.ones(b, 7, 4, dtype=F64)
        )
        assert bool(calls) == expect_blocked
        for a, e in zip(res["auto"], res["explicit"]):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    calls.clear()
    monkeypatch.setattr(fast_mod, "SDPA_TRAINING_MAX_AFFINITY", 41)  # 7 × 6 = 42 keys·queries
    theta, phi, g, _ = make_inputs("embedded_gaussian", b=2, d=4, dv=4, grad=True)
    nonlocal_attention(theta, phi, g, pairwise="embedded_gaussian").sum().backward()
    assert calls


def test_worker_threads_leave_thread_settings_alone(monkeypatch):
    """The workers run one-thread ops; the caller's and new threads' settings are unchanged."""
    import threading

    monkeypatch.setattr(fast_mod, "PARALLEL_WORKERS", 2)
    monkeypatch.setattr(fast_mod, "_POOL", None)  # create the workers in this test
    monkeypatch.setattr(fast_mod, "MAX_QUERY_BLOCK", 10)  # 4 tiles of rows
    before = torch.get_num_threads()
    t = [torch.randn(1, 40, 8).requires_grad_() for _ in range(3)]
    nonlocal_attention(*t, pairwise="gaussian").sum().backward()
    assert fast_mod._POOL is not None and fast_mod._POOL.size == 2
    assert torch.get_num_threads() == before
    seen = []
    th = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    th.start()
    th.join()
    assert seen == [before]
    inside = fast_mod._POOL.run([torch.get_num_threads, torch.is_grad_enabled])
    assert inside == [1, False]


def test_worker_errors_reach_the_caller(monkeypatch):
    monkeypatch.setattr(fast_mod, "PARALLEL_WORKERS", 2)

    def worker(next_tile):
        while next_tile() < 5:
            pass
        raise ValueError("boom in a worker")

    with pytest.raises(ValueError, match="boom in a worker"):
        fast_mod._run_tiles(5, 1 << 30, worker)
    tiles = []

    def collect(next_tile):
        while (t := next_tile()) < 7:
            tiles.append(t)

    fast_mod._run_tiles(7, 1 << 30, collect)  # the pool still works, every tile done once
    assert sorted(tiles) == list(range(7))


def test_float32_gradients_match_explicit():
    gen = torch.Generator().manual_seed(1)
    t = [torch.randn(2, 300, 32, generator=gen, requires_grad=True) for _ in range(3)]
    grads = {}
    for backend in ("auto", "explicit"):
        y = nonlocal_attention(*t, pairwise="embedded_gaussian", backend=backend)
        grads[backend] = torch.autograd.grad((y * y.detach().flip(1)).sum(), t)
    for a, e in zip(grads["auto"], grads["explicit"]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_concatenation_rounding_no_worse_than_explicit():
    """float32 inputs: the prefix-sum path is at least as close to a float64 truth as explicit."""
    gen = torch.Generator().manual_seed(5)
    b, nq, nk, d, dv = 2, 400, 900, 16, 8
    theta = torch.randn(b, nq, d, generator=gen) + 3.0  # offsets: a and b of opposite signs
    phi = torch.randn(b, nk, d, generator=gen) - 3.0
    g = torch.randn(b, nk, dv, generator=gen) + 1.0
    w = torch.randn(2 * d, generator=gen)
    truth = nonlocal_attention(
        theta.double(),
        phi.double(),
        g.double(),
        pairwise="concatenation",
        concat_weight=w.double(),
        backend="explicit",
    )
    errs = {}
    for backend in ("auto", "explicit"):
        y = nonlocal_attention(
            theta, phi, g, pairwise="concatenation", concat_weight=w, backend=backend
        )
        assert y.dtype == torch.float32
        errs[backend] = (y.double() - truth).abs().max().item()
    assert errs["auto"] <= errs["explicit"] * 1.01 + 1e-12, errs


def test_dot_product_is_reassociated_exactly():
    theta, phi, g, _ = make_inputs("dot_product", nq=50, nk=40, d=8, dv=6)
    mask = make_mask(nk=40)
    n = (~mask).sum(1).to(F64)[:, None, None]
    phi0 = phi.masked_fill(mask[:, :, None], 0)
    expected = (theta @ phi0.transpose(1, 2)) / n @ g
    y = nonlocal_attention(theta, phi, g, pairwise="dot_product", key_padding_mask=mask)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("form", FORMS)
def test_autocast_matches_float32_without_overflow(form, amp_dtype):
    """Logits up to ~±40: exp would overflow float16 (max 65504 ≈ e^11) if taken naively."""
    gen = torch.Generator().manual_seed(7)
    b, nq, nk, d = 2, 64, 48, 16
    theta = torch.randn(b, nq, d, generator=gen) * 2.0
    phi = torch.randn(b, nk, d, generator=gen) * 2.0
    g = torch.randn(b, nk, d, generator=gen)
    w = torch.randn(2 * d, generator=gen) if form == "concatenation" else None
    kw = dict(pairwise=form, concat_weight=w, scale=1.0 if form != "concatenation" else None)
    ref = nonlocal_attention(theta, phi, g, backend="explicit", **kw)
    if form in ("gaussian", "embedded_gaussian"):
        assert (theta @ phi.transpose(1, 2)).abs().max() > 30  # really large logits
    for backend in ("auto", "explicit"):
        with torch.autocast("cpu", dtype=amp_dtype):
            y = nonlocal_attention(
                theta.to(amp_dtype), phi.to(amp_dtype), g.to(amp_dtype), backend=backend, **kw
            )
        assert torch.isfinite(y).all()
        # bf16 rounds the logits themselves (8 bits): allow a few percent of g's scale.
        tol = 0.25 if amp_dtype == torch.bfloat16 else 0.05
        if form in ("gaussian", "embedded_gaussian"):
            tol *= 2  # rounding in logits of magnitude ~40 moves peaked softmax weights
        assert (y.float() - ref).abs().max() < tol, (form, backend, amp_dtype)


def test_autocast_with_float32_inputs_and_grad():
    gen = torch.Generator().manual_seed(2)
    t = [torch.randn(1, 40, 8, generator=gen, requires_grad=True) for _ in range(3)]
    ref = nonlocal_attention(*t, pairwise="embedded_gaussian", backend="explicit")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = nonlocal_attention(*t, pairwise="embedded_gaussian")
    y.float().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in t)
    assert (y.float() - ref).abs().max() < 0.05


def test_no_affinity_matrix_is_allocated_by_auto(monkeypatch):
    """No op of auto (forward + backward) allocates near one Nq × Nk matrix, the softmax forms'
    kept weights included (a budget of 1/8 of the matrix here)."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setattr(fast_mod, "TILE_ELEMENTS", 1 << 18)  # 1/16 of the matrix below
    monkeypatch.setattr(fast_mod, "MIN_PARALLEL_WORK", 0)  # workers too (all threads profiled)
    monkeypatch.setattr(fast_mod, "SCORE_CACHE_BYTES", 2048 * 2048 * 4 // 8)

    gen = torch.Generator().manual_seed(0)
    nq = nk = 2048
    for form, d in {
        "gaussian": 24,
        "embedded_gaussian": 16,
        "dot_product": 16,
        "concatenation": 16,
    }.items():
        theta = torch.randn(1, nq, d, generator=gen, requires_grad=True)
        phi = torch.randn(1, nk, d, generator=gen, requires_grad=True)
        g = torch.randn(1, nk, d, generator=gen, requires_grad=True)
        w = torch.randn(2 * d, generator=gen) if form == "concatenation" else None
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            y = nonlocal_attention(theta, phi, g, pairwise=form, concat_weight=w)
            y.sum().backward()
        biggest = max(e.cpu_memory_usage for e in prof.events())
        assert 0 < biggest < nq * nk * 4 / 4, (form, biggest)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        nonlocal_attention(theta, phi, g, pairwise="gaussian", backend="explicit").sum().backward()
    assert max(e.cpu_memory_usage for e in prof.events()) >= nq * nk * 4  # the test can fail


# -- errors -------------------------------------------------------------------------------------
def test_errors_name_the_problem():
    theta, phi, g, w = make_inputs("concatenation")
    with pytest.raises(ValueError, match=r"unknown pairwise 'cosine'.*'gaussian'"):
        nonlocal_attention(theta, phi, g, pairwise="cosine")
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*'auto', 'explicit'"):
        nonlocal_attention(theta, phi, g, pairwise="dot_product", backend="fast")
    with pytest.raises(ValueError, match=r"theta must have shape \(B, N, d\)"):
        nonlocal_attention(theta[0], phi, g, pairwise="dot_product")
    with pytest.raises(ValueError, match="share their last dim"):
        nonlocal_attention(theta[..., :3], phi, g, pairwise="dot_product")
    with pytest.raises(ValueError, match="same number of keys"):
        nonlocal_attention(theta, phi, g[:, :3], pairwise="dot_product")
    with pytest.raises(ValueError, match="batch sizes differ"):
        nonlocal_attention(theta, phi[:1], g[:1], pairwise="dot_product")
    with pytest.raises(ValueError, match="needs concat_weight"):
        nonlocal_attention(theta, phi, g, pairwise="concatenation")
    with pytest.raises(ValueError, match="2\\*d = 10"):
        nonlocal_attention(theta, phi, g, pairwise="concatenation", concat_weight=w[:4])
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Nk\)"):
        nonlocal_attention(
            theta,
            phi,
            g,
            pairwise="dot_product",
            key_padding_mask=torch.zeros(2, 5, dtype=torch.bool),
        )
    with pytest.raises(TypeError, match="must be a bool tensor"):
        nonlocal_attention(
            theta, phi, g, pairwise="dot_product", key_padding_mask=torch.zeros(2, 6)
        )
    with pytest.raises(ValueError, match="masks every key"):
        nonlocal_attention(
            theta, phi, g, pairwise="gaussian", key_padding_mask=torch.ones(2, 6, dtype=torch.bool)
        )
    with pytest.raises(TypeError, match="floating-point"):
        nonlocal_attention(theta.long(), phi, g, pairwise="gaussian")


def test_double_backward_is_refused_clearly(monkeypatch):
    monkeypatch.setattr(fast_mod, "SDPA_TRAINING_MAX_AFFINITY", 0)  # the blocked kernels
    theta, phi, g, _ = make_inputs("embedded_gaussian", grad=True, d=4, dv=4)
    y = nonlocal_attention(theta, phi, g, pairwise="embedded_gaussian")
    (gt,) = torch.autograd.grad(y.sum(), theta, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|does not require grad"):
        torch.autograd.grad(gt.sum(), theta)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("form", FORMS)
def test_cuda_matches_explicit_and_autocast(form):
    """On CUDA the softmax forms go through SDPA's fused kernels (d ≠ dv zero-padded)."""
    gen = torch.Generator().manual_seed(0)
    b, nq, nk, d, dv = 2, 300, 200, 32, 16
    t = [torch.randn(*s, generator=gen).cuda() for s in ((b, nq, d), (b, nk, d), (b, nk, dv))]
    w = torch.randn(2 * d, generator=gen).cuda() if form == "concatenation" else None
    mask = torch.zeros(b, nk, dtype=torch.bool, device="cuda")
    mask[1, 150:] = True
    kw = dict(pairwise=form, concat_weight=w, key_padding_mask=mask)
    ref = nonlocal_attention(*(x.double() for x in t), backend="explicit", **kw)
    y = nonlocal_attention(*t, **kw)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.float16):
        y16 = nonlocal_attention(*(x * 4 for x in t), **kw)
    assert torch.isfinite(y16).all()


@pytest.mark.parametrize("chunk", [32, 2])
def test_concatenation_custom_backward_equals_autograd_path(chunk, monkeypatch):
    """The eager Function's hand-written backward equals autograd through the traced path."""
    monkeypatch.setattr(fast_mod, "CONCAT_CHANNEL_CHUNK", chunk)  # 2: several channel passes
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(2, 40, generator=gen, dtype=F64, requires_grad=True)
    b = torch.randn(2, 30, generator=gen, dtype=F64, requires_grad=True)
    g = torch.randn(2, 30, 5, generator=gen, dtype=F64, requires_grad=True)
    mask = make_mask(nk=30)
    n = (~mask).sum(1).to(F64).view(-1, 1, 1)
    dy = torch.randn(2, 40, 5, generator=gen, dtype=F64)
    outs = []
    for fn in (fast_mod._ConcatPrefixSums.apply, fast_mod._concat_prefix_sums):
        y = fn(a, b, g, n, mask, F64)
        outs.append((y, *torch.autograd.grad(y, (a, b, g), dy)))
    for x, r in zip(*outs):
        torch.testing.assert_close(x, r, rtol=1e-12, atol=1e-12)
    assert outs[0][1].abs().sum() > 0 and outs[0][3][1, 3:].abs().sum() == 0  # padded: no grad


@pytest.mark.parametrize("use_mask", [False, True])
def test_small_training_affinity_uses_plain_products(monkeypatch, use_mask):
    """CPU training at B·Nq·Nk ≤ EXPLICIT_TRAINING_MAX_AFFINITY: plain products on the explicit
    matrix (no kernel called), values and gradients equal to the explicit backend's in float64;
    above it the blocked kernels."""
    monkeypatch.setattr(fast_mod, "EXPLICIT_TRAINING_MAX_AFFINITY", 1 * 9 * 7)
    monkeypatch.setattr(fast_mod, "SDPA_TRAINING_MAX_AFFINITY", 0)
    calls = []
    orig = fast_mod._SoftmaxAttentionCPU.apply
    monkeypatch.setattr(
        fast_mod._SoftmaxAttentionCPU, "apply", lambda *a: calls.append(1) or orig(*a)
    )
    gen = torch.Generator().manual_seed(11)
    for b, kernel in ((1, False), (2, True)):
        t = [
            torch.randn(b, 9, 4, generator=gen, dtype=F64, requires_grad=True),
            torch.randn(b, 7, 4, generator=gen, dtype=F64, requires_grad=True),
            torch.randn(b, 7, 3, generator=gen, dtype=F64, requires_grad=True),
        ]
        mask = None
        if use_mask:
            mask = torch.zeros(b, 7, dtype=torch.bool)
            mask[:, 5:] = True
        calls.clear()
        res = _explicit_and_auto_grads(
            "embedded_gaussian", t, mask, torch.randn(b, 9, 3, dtype=F64)
        )
        assert bool(calls) == kernel
        for a, e in zip(res["auto"], res["explicit"]):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
        if use_mask:
            assert res["auto"][3][:, 5:].abs().max() == 0  # no gradient reaches padded values


def test_score_cache_budget_from_the_environment():
    """NLNET_SCORE_CACHE_MIB: MiB per process (default 1024, 0 keeps none); anything else is an
    error naming the variable and the value."""
    parse = fast_mod._score_cache_bytes_from_env
    assert parse(None) == parse("") == 1024 << 20
    assert parse("0") == 0 and parse("1.5") == 3 << 19
    for bad in ("lots", "-1", "nan", "inf"):
        with pytest.raises(ValueError, match=rf"NLNET_SCORE_CACHE_MIB must be .*{bad!r}"):
            parse(bad)


def test_kept_weights_budget_survives_a_failed_allocation(monkeypatch):
    """Out of memory while allocating the kept weights: the error reaches the caller and the
    budget gets back every byte (nothing stays reserved for tiles that do not exist)."""
    monkeypatch.setattr(fast_mod, "PARALLEL_WORKERS", 2)
    monkeypatch.setattr(fast_mod, "MAX_QUERY_BLOCK", 10)
    t = _blocked_inputs()
    real, calls = torch.Tensor.new_empty, []

    def failing(self, *size, **kw):
        calls.append(size)
        if len(calls) == 3:
            raise RuntimeError("out of memory (test)")
        return real(self, *size, **kw)

    monkeypatch.setattr(torch.Tensor, "new_empty", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        fast_mod._ScoreCache(fast_mod._tiles(2, 40, 2), 30, 30, t[0].detach())
    monkeypatch.setattr(torch.Tensor, "new_empty", real)
    import gc

    gc.collect()
    assert len(calls) == 3 and fast_mod.score_cache_bytes() == 0
