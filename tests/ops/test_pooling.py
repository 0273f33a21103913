"""Max-pooling keeps the input's dtype under autocast, with the exact values of a float32 pool."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nlnet.models.resnet import _checked_pool
from nlnet.ops.pooling import max_pool


def test_max_pool_keeps_bf16_under_cpu_autocast_and_is_exact() -> None:
    x = torch.randn(2, 4, 6, 9, 9, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.max_pool3d(x, 3, 2, 1)  # autocast's float32 policy: a float32 copy
        ours = max_pool(F.max_pool3d, x, 3, 2, 1)
    assert plain.dtype == torch.float32  # the behaviour this helper exists to avoid
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours.float(), F.max_pool3d(x.float(), 3, 2, 1))


def test_max_pool_gradient_under_autocast_matches_float32() -> None:
    """The bf16 pool's gradient routes each output's gradient to the same inputs as a float32
    pool of the same values: the same non-zero entries, values equal up to the bf16 rounding of
    the sums where overlapping windows pick the same input."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 4, 8, 8, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(1, 3, 4, 4, 4, generator=gen).bfloat16().float()
    module = torch.nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = max_pool(module, x)
    assert y.dtype == torch.bfloat16
    (g,) = torch.autograd.grad((y.float() * w).sum(), x)
    x32 = x.detach().float().requires_grad_()
    (ref,) = torch.autograd.grad((module(x32) * w).sum(), x32)
    assert g.dtype == torch.bfloat16 and ref.abs().sum() > 0
    assert torch.equal(g != 0, ref != 0)
    torch.testing.assert_close(g.float(), ref, rtol=8e-3, atol=0)


def test_resnet_pools_stay_in_bf16_under_autocast() -> None:
    pool = torch.nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))
    x = torch.randn(1, 8, 2, 10, 10).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _checked_pool(pool, x, "pool1")
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, pool(x))
