"""Lean training (``nlnet.ops.recompute``): the plain computation's values and gradients (float64
references on random inputs), with less kept for the backward."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nlnet.models import create_model
from nlnet.ops import recompute
from nlnet.ops.pooling import max_pool
from nlnet.ops.recompute import batch_norm_relu, lean_max_pool, lean_region


@pytest.fixture(autouse=True)
def _lean_at_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests use small tensors; below ``MIN_BYTES`` nothing would be recomputed."""
    monkeypatch.setattr(recompute, "MIN_BYTES", 0)


def test_activations_under_min_bytes_are_kept_as_usual(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recompute, "MIN_BYTES", 1 << 20)
    gen = torch.Generator().manual_seed(9)
    bn = _bn(4, gen)
    small = torch.randn(1, 4, 2, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    big = torch.randn(1, 4, 8, 64, 64, generator=gen, dtype=torch.float64, requires_grad=True)
    with lean_region():
        assert type(batch_norm_relu(bn, small).grad_fn).__name__ == "ReluBackward0"
        assert type(batch_norm_relu(bn, big).grad_fn).__name__ == "_BatchNormReLUBackward"
        pooled = lean_max_pool(F.max_pool3d, small, kernel_size=2)
        assert type(pooled.grad_fn).__name__ != "_MaxPoolBackward"
        assert type(lean_max_pool(F.max_pool3d, big, kernel_size=2).grad_fn).__name__ == (
            "_MaxPoolBackward"
        )


def _bn(channels: int, gen: torch.Generator, dtype=torch.float64) -> nn.BatchNorm3d:
    bn = nn.BatchNorm3d(channels, momentum=0.3).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.normal_(0.0, 0.5, generator=gen)
        bn.running_mean.normal_(generator=gen)
    return bn


def test_batch_norm_relu_matches_the_plain_layers_in_float64() -> None:
    """Output, the gradients of input, γ and β, the running statistics and the batch counter
    are those of ``F.relu(bn(y))``; a float64 gradcheck of the lean op passes."""
    gen = torch.Generator().manual_seed(0)
    bn = _bn(6, gen)
    plain = copy.deepcopy(bn)
    y = torch.randn(2, 6, 3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    dz = torch.randn(2, 6, 3, 5, 4, generator=gen, dtype=torch.float64)
    with lean_region():
        z = batch_norm_relu(bn, y)
    assert type(z.grad_fn).__name__ == "_BatchNormReLUBackward"
    ours = torch.autograd.grad(z, (y, bn.weight, bn.bias), dz)
    z_ref = F.relu(plain(y))
    ref = torch.autograd.grad(z_ref, (y, plain.weight, plain.bias), dz)
    assert torch.equal(z, z_ref)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert b.abs().sum() > 0
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(plain, name)), name

    def lean(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with lean_region():
            return recompute._BatchNormReLU.apply(t, w, b, None, None, 0.1, 1e-5)

    inputs = (y[:, :3, :2].detach().requires_grad_(), bn.weight[:3], bn.bias[:3])
    assert torch.autograd.gradcheck(lean, inputs)


def test_relu_output_is_not_kept_for_the_next_convolution() -> None:
    """In a lean region BN → ReLU → conv keeps the BN input only: the ReLU output is freed after
    the forward (outside a region autograd keeps it), and the conv's weight gradient, which
    needs it, is still the plain one."""
    gen = torch.Generator().manual_seed(1)
    bn, conv = _bn(4, gen), nn.Conv3d(4, 5, 3, padding=1).double()
    y = torch.randn(1, 4, 3, 6, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    grads, alive = [], []
    for lean in (True, False):
        conv.zero_grad()
        with lean_region(lean):
            r = batch_norm_relu(bn, y)
            out = conv(r)
        ref = weakref.ref(r)
        del r
        gc.collect()
        alive.append(ref() is not None)
        out.pow(2).sum().backward()
        grads.append(conv.weight.grad.clone())
    assert alive == [False, True]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_recomputed_output_serves_a_second_backward() -> None:
    """``retain_graph=True``: the recipe runs again for a second backward (same gradients)."""
    gen = torch.Generator().manual_seed(2)
    bn, conv = _bn(3, gen), nn.Conv3d(3, 3, 1).double()
    y = torch.randn(2, 3, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    with lean_region():
        loss = conv(batch_norm_relu(bn, y)).sin().sum()
    (g1,) = torch.autograd.grad(loss, y, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, y)
    assert torch.equal(g1, g2) and g1.abs().sum() > 0


@pytest.mark.parametrize("kind", ["module3d", "functional3d", "functional2d"])
def test_lean_max_pool_keeps_no_indices_and_routes_gradients_like_the_plain_pool(kind) -> None:
    """Values and input gradients equal the plain pool's, ties included (integer-valued input:
    the argmax found again in the backward is the forward's); only the input is kept."""
    gen = torch.Generator().manual_seed(3)
    if kind == "module3d":
        pool, kw, shape = nn.MaxPool3d((2, 3, 3), (2, 2, 2), (0, 1, 1)), {}, (2, 3, 4, 9, 9)
    elif kind == "functional3d":
        pool, kw, shape = (
            F.max_pool3d,
            {"kernel_size": (1, 2, 2), "stride": (1, 2, 2)},
            (1, 4, 3, 8, 8),
        )
    else:
        pool, kw, shape = F.max_pool2d, {"kernel_size": 2, "stride": 2}, (2, 4, 8, 6)
    for values in ("random", "ties"):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        if values == "ties":
            x = x.mul(2).round()
        x.requires_grad_()
        with lean_region():
            y = lean_max_pool(pool, x, **kw)
        assert type(y.grad_fn).__name__ == "_MaxPoolBackward"
        saved = y.grad_fn.saved_tensors
        assert len(saved) == 1 and saved[0].dtype == torch.float64  # no int64 argmax
        dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        (g,) = torch.autograd.grad(y, x, dy)
        ref_y = pool(x, **kw)
        (ref,) = torch.autograd.grad(ref_y, x, dy)
        assert torch.equal(y, ref_y) and torch.equal(g, ref) and ref.abs().sum() > 0
    x = torch.randn(1, 2, *shape[2:], generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _in_region(lean_max_pool, pool, t, **kw), (x,))


def _in_region(fn, *args, **kwargs):
    with lean_region():
        return fn(*args, **kwargs)


def test_outside_a_region_everything_is_plain() -> None:
    """No region, eval mode or no gradients: the plain layers' autograd nodes."""
    gen = torch.Generator().manual_seed(4)
    bn = _bn(2, gen)
    y = torch.randn(1, 2, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert type(batch_norm_relu(bn, y).grad_fn).__name__ == "ReluBackward0"
    assert type(max_pool(F.max_pool3d, y, kernel_size=2).grad_fn).__name__ != "_MaxPoolBackward"
    bn.eval()
    with lean_region():
        assert type(batch_norm_relu(bn, y).grad_fn).__name__ == "ReluBackward0"
        with torch.no_grad():
            assert batch_norm_relu(bn.train(), y).grad_fn is None
    hooked = _bn(2, gen)
    hooked.register_forward_hook(lambda *a: None)  # a hook on the BN must still fire
    with lean_region():
        assert type(batch_norm_relu(hooked, y).grad_fn).__name__ == "ReluBackward0"
    assert not recompute.active()


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
def test_global_and_backward_hooks_still_fire(kind: str) -> None:
    """A global module hook (or a backward hook on the BN) sees every BN of a lean region:
    such a BN runs as the plain module."""
    gen = torch.Generator().manual_seed(6)
    bn = _bn(2, gen)
    y = torch.randn(1, 2, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    seen: list[nn.Module] = []
    register = {
        "forward": lambda: nn.modules.module.register_module_forward_hook(
            lambda m, *a: seen.append(m)
        ),
        "forward_pre": lambda: nn.modules.module.register_module_forward_pre_hook(
            lambda m, *a: seen.append(m)
        ),
        "full_backward": lambda: bn.register_full_backward_hook(lambda m, *a: seen.append(m)),
    }[kind]
    handle = register()
    try:
        with lean_region():
            z = batch_norm_relu(bn, y)
        z.sum().backward()
    finally:
        handle.remove()
    assert seen and seen[0] is bn
    with lean_region():  # with the hook gone the BN is lean again
        assert type(batch_norm_relu(bn, y).grad_fn).__name__ == "_BatchNormReLUBackward"


def test_single_value_per_channel_is_rejected_like_batch_norm() -> None:
    bn = _bn(3, torch.Generator().manual_seed(5))
    with lean_region(), pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_relu(bn, torch.randn(1, 3, 1, 1, 1, dtype=torch.float64, requires_grad=True))


def _node_names(y: torch.Tensor) -> list[str]:
    """The autograd nodes ``y`` was computed through (each node once)."""
    seen, stack, names = set(), [y.grad_fn], []
    while stack:
        node = stack.pop()
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            names.append(type(node).__name__)
            stack.extend(fn for fn, _ in node.next_functions)
    return names


def _step(model: nn.Module, x: torch.Tensor, bf16: bool) -> tuple[torch.Tensor, dict, list[str]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = model(x)
    nodes = _node_names(y)
    w = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape)
    (y.double() * w).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), grads, nodes


@pytest.mark.parametrize("bf16", [False, True], ids=["float64", "bf16-autocast"])
def test_video_resnet_lean_training_equals_the_plain_graph(bf16: bool) -> None:
    """A whole I3D-NL training step, lean (the default) and plain: the same logits, every
    parameter's gradient and BN statistics (float64; and bf16 autocast on channels-last, the
    CPU training default), and the lean graph has the lean nodes, the plain one none."""
    torch.manual_seed(0)
    dtype = torch.float32 if bf16 else torch.float64
    lean = create_model("i3d_r50_nl5", num_classes=7, dropout=0.0, variant="speed").to(dtype)
    if bf16:
        lean = lean.to(memory_format=torch.channels_last_3d)
    plain = copy.deepcopy(lean)
    plain.lean_training = False
    assert lean.lean_training and not plain.lean_training
    x = torch.randn(2, 3, 4, 48, 48, dtype=dtype)
    (y1, g1, n1), (y2, g2, n2) = _step(lean.train(), x, bf16), _step(plain.train(), x, bf16)
    assert torch.equal(y1, y2) and set(g1) == set(g2) and len(g1) > 100
    # the lean graph: every backbone BN+ReLU and max-pool without its output / argmax
    bn_relu = n1.count("_BatchNormReLUBackward")
    assert bn_relu == 1 + 2 * 16 and n1.count("_MaxPoolBackward") >= 2  # stem + 2 per block
    assert "_BatchNormReLUBackward" not in n2 and "_MaxPoolBackward" not in n2
    for name in g2:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-6, atol=1e-9, msg=name)
    assert sum(g.abs().sum() for g in g2.values()) > 0
    sd1, sd2 = lean.state_dict(), plain.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_lean_training_is_once_differentiable_and_can_be_turned_off() -> None:
    """A double backward (gradient penalty) through the lean graph raises; with
    ``lean_training = False`` it runs."""
    torch.manual_seed(1)
    model = create_model("c2d_r50", num_classes=3, dropout=0.0, variant="speed").double().train()
    x = torch.randn(2, 3, 2, 32, 32, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"differentiate"):
        g.pow(2).sum().backward()
    model.lean_training = False
    (g,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    g.pow(2).sum().backward()
    assert model.stem.conv.weight.grad is not None
