"""The fast eval path (nlnet.fuse): BN folding, channels-last, oneDNN fusions, against the plain
layer-by-layer network on random weights with randomised BN statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nlnet import NonLocalBlock, fuse
from nlnet.models import VideoResNet, create_model, freeze_batch_norm


def _randomise_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                shape = m.running_mean.shape
                m.running_mean.copy_(torch.randn(shape, generator=gen, dtype=torch.float64))
                m.running_var.copy_(0.2 + torch.rand(shape, generator=gen, dtype=torch.float64))
                m.weight.copy_(0.5 + torch.rand(shape, generator=gen, dtype=torch.float64))
                m.bias.copy_(torch.randn(shape, generator=gen, dtype=torch.float64))
    return model


def _small(block: str = "bottleneck", **kw) -> VideoResNet:
    torch.manual_seed(0)
    kw = {
        "stage_blocks": (2, 2),
        "stage_widths": (4, 8),
        "temporal_kernels": [[3, 1], [1, 3]],
        "stem_channels": 8,
        "stem_kernel": (3, 5, 5),
        "block": block,
        "nonlocal_blocks": {2: [0], 3: [1]},
        "nonlocal_kwargs": {"subsample": (1, 2, 2), "init_std": 0.2, "zero_init": False},
        "num_classes": 7,
        "dropout": 0.0,
        **kw,
    }
    return _randomise_bn(VideoResNet(**kw))


def _pair(model: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    fast = model.to(dtype).eval()
    plain = copy.deepcopy(fast)
    plain.fast_inference = False
    return fast, plain


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _clip(dtype: torch.dtype = torch.float64, frames: int = 8, size: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    return torch.randn(2, 3, frames, size, size, generator=gen, dtype=dtype)


@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_batch_norm_is_exact_in_float64(with_bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv3d(5, 6, (3, 3, 3), stride=(1, 2, 2), padding=1, bias=with_bias).double()
    bn = _randomise_bn(nn.BatchNorm3d(6)).double().eval()
    x = torch.randn(2, 5, 4, 9, 9, dtype=torch.float64)
    w, b = fuse.fold_batch_norm(conv, bn)
    ref = bn(conv(x))
    out = nn.functional.conv3d(x, w, b, conv.stride, conv.padding)
    assert _rel(out, ref) < 1e-13
    assert w.dtype == torch.float64 and w.shape == conv.weight.shape


def test_fold_frozen_batch_norm_is_exact_in_float64() -> None:
    model = freeze_batch_norm(_small())
    fast, plain = _pair(model, torch.float64)
    x = _clip()
    with torch.no_grad():
        assert _rel(fast(x), plain(x)) < 1e-12


@pytest.mark.parametrize("block", ["bottleneck", "basic"])
@pytest.mark.parametrize("pairwise", ["embedded_gaussian", "gaussian", "dot_product"])
def test_fast_eval_forward_equals_plain_float64(block: str, pairwise: str) -> None:
    kw = {"subsample": (1, 2, 2), "init_std": 0.2, "zero_init": False, "pairwise": pairwise}
    fast, plain = _pair(_small(block, nonlocal_kwargs=kw), torch.float64)
    x = _clip()
    calls = []
    real = fuse.conv_bn

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with torch.no_grad():
        ref = plain(x)
        assert not calls
        fuse.conv_bn = counting  # the model and block modules look it up at call time
        try:
            out = fast(x)
        finally:
            fuse.conv_bn = real
    assert calls, "the fast path was not taken"
    assert out.shape == ref.shape
    assert _rel(out, ref) < 1e-12


def test_fast_eval_forward_float32_is_as_accurate_as_plain() -> None:
    """oneDNN has no float64: both float32 forwards are compared with the float64 plain one."""
    model = _small()
    _, ref64 = _pair(copy.deepcopy(model), torch.float64)
    fast, plain = _pair(model, torch.float32)
    x = _clip(torch.float32, frames=8, size=48)
    with torch.no_grad():
        truth = ref64(x.double())
        out, base = fast(x), plain(x)
        assert fuse.enabled(fast, x)
    assert _rel(out.double(), truth) < 1e-5
    assert _rel(out.double(), truth) < 10 * _rel(base.double(), truth) + 1e-6
    assert _rel(out, base) < 1e-5


def test_i3d_r50_nl5_float32_relative_error() -> None:
    """The paper's network at a small clip: the default equals the plain network to ≤1e-5."""
    torch.manual_seed(0)
    fast = _randomise_bn(create_model("i3d_r50_nl5", num_classes=10)).eval()
    plain = create_model("i3d_r50_nl5", num_classes=10, backend="explicit").eval()
    plain.load_state_dict(fast.state_dict())
    plain.fast_inference = False
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        assert _rel(fast(x), plain(x)) < 1e-5


def test_state_dict_unchanged_and_copyable_after_fast_forward() -> None:
    model = _small().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(_clip(torch.float32))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    clone = copy.deepcopy(model)  # the cache lives outside the module: nothing to copy
    with torch.no_grad():
        torch.testing.assert_close(clone(_clip(torch.float32)), model(_clip(torch.float32)))


def test_cache_follows_loaded_weights_optimizer_steps_and_bn_statistics() -> None:
    fast, plain = _pair(_small(), torch.float64)
    x = _clip()

    def check() -> None:
        plain.load_state_dict(fast.state_dict())
        fast.eval()
        plain.eval()
        with torch.no_grad():
            assert _rel(fast(x), plain(x)) < 1e-12

    check()
    fast.load_state_dict(_randomise_bn(_small(), seed=5).double().state_dict())  # new weights
    check()
    opt = torch.optim.SGD(fast.parameters(), lr=0.1)
    fast.train()
    fast(x).sum().backward()  # also updates the BN running statistics in place
    opt.step()
    check()
    fast.train()
    with torch.no_grad():
        fast(x)  # running statistics only (no version bump on them): compared by value
    check()


def test_plain_path_when_grad_enabled_training_or_hooked() -> None:
    model = _small().eval()
    x = _clip(torch.float32)
    assert not fuse.enabled(model, x)  # autograd on
    with torch.no_grad():
        assert fuse.enabled(model, x)
        model.fast_inference = False
        assert not fuse.enabled(model, x)
        assert all(not b.fast_inference for b in model.modules() if isinstance(b, NonLocalBlock))
        model.fast_inference = True
        model.res3[0].bn_a.train()
        assert not fuse.enabled(model, x)  # a BN in train mode cannot be folded
        model.eval()
        handle = model.res2.register_forward_hook(lambda *a: None)
        assert not fuse.enabled(model, x)  # a hook must see the modules run
        handle.remove()
        assert fuse.enabled(model, x)
        assert not fuse.enabled(model, x.to("meta"))


def test_eval_with_grad_gives_input_gradients_of_the_plain_network() -> None:
    fast, plain = _pair(_small(), torch.float64)
    x1 = _clip().requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    fast(x1).square().sum().backward()
    plain(x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-12, atol=1e-12)


def test_training_step_default_equals_explicit_backend_float64() -> None:
    """Training runs the plain modules: the default (auto NL backend) matches the explicit one."""
    torch.manual_seed(0)
    a = _small().double().train()
    kw = {"subsample": (1, 2, 2), "init_std": 0.2, "zero_init": False, "backend": "explicit"}
    b = _small(nonlocal_kwargs=kw).double().train()
    b.load_state_dict(a.state_dict())
    x = _clip()
    la, lb = a(x).logsumexp(1).sum(), b(x).logsumexp(1).sum()
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-12, atol=0)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-9, atol=1e-12, msg=name)
    for (name, ba), bb in zip(a.named_buffers(), b.buffers()):
        torch.testing.assert_close(ba, bb, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("norm", ["batch", None])
@pytest.mark.parametrize("pool_before_conv", [True, False])
def test_nonlocal_block_fast_eval_float64(
    dim: int, norm: str | None, pool_before_conv: bool
) -> None:
    torch.manual_seed(0)
    block = NonLocalBlock(
        6, dim=dim, norm=norm, zero_init=False, init_std=0.3, pool_before_conv=pool_before_conv
    )
    block = _randomise_bn(block).double().eval()
    plain = copy.deepcopy(block)
    plain.fast_inference = False
    x = torch.randn(2, 6, *[4, 6, 6][3 - dim :], dtype=torch.float64)
    mask = torch.zeros(2, *x.shape[2:], dtype=torch.bool)
    mask[1, ..., -1] = True
    with torch.no_grad():
        assert fuse.enabled(block, x)
        z, w = block(x, return_attention=True, key_padding_mask=mask)
        z_ref, w_ref = plain(x, return_attention=True, key_padding_mask=mask)
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kw",
    [
        {"extent": "space"},
        {"extent": "time"},
        {"temporal_groups": 2},
        {"pairwise": "concatenation"},
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nonlocal_block_fast_eval_layouts(kw: dict, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    block = _randomise_bn(NonLocalBlock(6, dim=3, zero_init=False, init_std=0.3, **kw))
    block = block.to(dtype).eval()
    plain = copy.deepcopy(block)
    plain.fast_inference = False
    x = torch.randn(2, 6, 4, 6, 6, dtype=dtype)
    with torch.no_grad():
        z, z_ref = block(x), plain(x)
        z_cl = block(x.contiguous(memory_format=torch.channels_last_3d))
    assert z.is_contiguous() and z_cl.is_contiguous(memory_format=torch.channels_last_3d)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert _rel(z, z_ref) < tol and _rel(z_cl, z_ref) < tol


def test_nonlocal_block_at_identity_is_exact_in_fast_eval() -> None:
    block = NonLocalBlock(8, dim=3).eval()  # γ = 0: z = x bit for bit
    x = torch.randn(1, 8, 2, 6, 6)
    with torch.no_grad():
        assert torch.equal(block(x), x)


@pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bfloat16 oneDNN kernels here"
)
def test_bf16_autocast_and_bf16_model_fast_eval_close_to_float32() -> None:
    fast, plain = _pair(_small(), torch.float32)
    x = _clip(torch.float32, size=48)
    with torch.no_grad():
        ref = plain(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fast(x)
            out_plain = plain(x)  # the plain network under autocast: the same rounding class
        out_model = copy.deepcopy(fast).to(torch.bfloat16)(x.to(torch.bfloat16))
    for y in (out, out_model):
        assert _rel(y.float(), ref) < 0.05
    assert _rel(out.float(), ref) < 5 * _rel(out_plain.float(), ref) + 1e-3


@pytest.mark.filterwarnings("ignore")
def test_tracing_sees_the_plain_modules_and_inference_mode_cache_is_reusable() -> None:
    model = _small().eval()
    x = _clip(torch.float32)
    with torch.inference_mode():
        first = model(x)  # the cache is built from inference tensors here
    with torch.no_grad():
        again = model(x)  # ... and reused outside inference mode
        traced = torch.jit.trace(model, x, check_trace=False)
    torch.testing.assert_close(again, first)
    graph = str(traced.inlined_graph)
    assert "mkldnn" not in graph and "batch_norm" in graph
    with torch.no_grad():
        torch.testing.assert_close(traced(x), first, rtol=1e-5, atol=1e-5)


def test_model_bench_compares_default_with_plain_and_judges_targets() -> None:
    from nlnet.benchmark import compare_model_times, model_markdown, model_target_report

    row = compare_model_times("i3d_r50_nl5", 8, 32, "eval", repeats=1, clock="cpu")
    assert row["rel_err"] < 1e-5 and row["default_s"] > 0 and row["plain_s"] > 0
    rows = [
        {"frames": 32, "mode": "eval", "default_s": 0.5, "plain_s": 1.0, "rel_err": 1e-7},
        {"frames": 8, "mode": "eval", "default_s": 0.95, "plain_s": 1.0, "rel_err": 1e-7},
        {"frames": 32, "mode": "train", "default_s": 0.8, "plain_s": 1.0},
    ]
    report, ok = model_target_report(rows)
    assert not ok  # 8 frames: 0.95 > 0.9
    assert "eval 8 frames time: default/plain = 0.950 (target ≤ 0.9) — MISSED" in report
    assert "eval 32 frames time: default/plain = 0.500 (target ≤ 0.75) — met" in report
    rows[1]["default_s"] = 0.5
    assert model_target_report(rows)[1]
    rows[0]["rel_err"] = 1e-3  # outputs must agree
    assert not model_target_report(rows)[1]
    assert "| 32×224² | eval | ?/? | 1.000 | 0.500 | 0.500 |" in model_markdown(rows, 224)
    rows[0]["rel_err"] = 1e-7
    rows[2].update(
        default_mib=650.0, plain_mib=1000.0, default_live_mib=500.0, plain_live_mib=700.0
    )
    report, ok = model_target_report(rows)
    assert not ok  # memory is judged on the live heap and on the peak RSS
    assert "memory (live heap): default/plain = 0.714 (target ≤ 0.6) — MISSED" in report
    assert "memory (peak RSS): default/plain = 0.650 (target ≤ 0.6) — MISSED" in report
    rows[2]["default_live_mib"] = 400.0
    report, ok = model_target_report(rows)
    assert not ok and "memory (live heap): default/plain = 0.571 (target ≤ 0.6) — met" in report
    rows[2]["default_mib"] = 550.0
    assert model_target_report(rows)[1]
    rows[2].update(default_live_mib=None, plain_live_mib=None, default_mib=650.0)  # no mallinfo2
    report, ok = model_target_report(rows)
    assert not ok and "memory (peak RSS): default/plain = 0.650 (target ≤ 0.6) — MISSED" in report
    assert "live heap" not in report


def test_train_mode_frees_the_folded_weights() -> None:
    model = _small().eval()
    with torch.no_grad():
        model(_clip(torch.float32))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert all(c in fuse._CACHE for c in convs)
    model.train()
    assert not any(c in fuse._CACHE for c in convs)
