"""Lean training: what the backward can recompute cheaply is not kept from the forward.

A ResNet's training step keeps, for every conv → BN → ReLU → conv, both the BN input (for BN's
backward) and the ReLU output (for the ReLU mask and the next convolution's weight gradient);
and max-pools keep an int64 index per output element.  Inside :func:`lean_region` (entered by
:class:`~nlnet.models.resnet.VideoResNet`'s training forward), for activations of at least
:data:`MIN_BYTES` (smaller ones are kept as usual):

* :func:`batch_norm_relu` keeps only the BN input and the batch statistics; its output (the next
  layer's input) is recomputed in the backward, ``relu(y·s + t)`` with ``s = γ/σ_B``,
  ``t = β − μ_B·s``, by PyTorch's own BN kernel in inference mode (:func:`_bn_relu`): the
  forward's values bit for bit in bfloat16 on CPU, at most one float32 rounding apart otherwise;
* :func:`lean_max_pool` keeps its input (usually kept anyway, or itself recomputable) and finds
  the argmax again in the backward.

The mechanism is PyTorch's saved-tensor hooks: a tensor registered with a recipe is replaced,
wherever autograd would save it, by the recipe, which is run at most once per backward and its
result dropped as soon as the last user has had it.  The gradients are those of the plain
computation (``tests/ops/test_recompute.py`` checks them against float64).  Outside a region
every function here is its plain counterpart.  Lean ops are ``once_differentiable``: a double
backward (e.g. a gradient penalty) needs ``VideoResNet.lean_training = False``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules import module as _module

_local = threading.local()

MIN_BYTES = 1 << 20
"""Smaller activations are kept as usual: recomputing them saves little memory and costs a few
more kernel launches (each a thread barrier, which is what slows a step when another process
competes for the cores).  In an I3D-R50 at 32×224² this leaves the stem, ``res2`` and the
first ``res3`` block lean: the activations alive at the training step's memory peak."""


class Recipe:
    """How to rebuild a tensor in the backward; the result is shared by its users, then dropped.

    ``users`` counts the places that will ask for the tensor (each autograd save of it, plus
    whoever created the recipe); the cached result is released when the count reaches zero.
    Asking again later (``retain_graph=True`` and a second backward) recomputes it.
    """

    __slots__ = ("_args", "_fn", "_value", "users")

    def __init__(self, fn: Callable[..., Tensor], *args: Any, users: int = 0) -> None:
        self._fn, self._args, self._value, self.users = fn, args, None, users

    def take(self) -> Tensor:
        value = self._value
        if value is None:
            value = self._fn(*self._args)
        self.users -= 1
        self._value = value if self.users > 0 else None
        return value


class _Region:
    """The tensors registered in one forward: ``id(tensor)`` → (weak reference, recipe)."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[weakref.ref[Tensor], Recipe]] = {}

    def pack(self, t: Tensor) -> Tensor | Recipe:
        entry = self.entries.get(id(t))
        if entry is not None and entry[0]() is t:  # the same live tensor, not a reused id
            entry[1].users += 1
            return entry[1]
        return t


def _unpack(saved: Tensor | Recipe) -> Tensor:
    return saved.take() if isinstance(saved, Recipe) else saved


def active() -> bool:
    """True inside a :func:`lean_region` (of this thread); never while torch.compile traces."""
    if torch.compiler.is_compiling():  # first: compiled graphs never see the thread-local
        return False
    return getattr(_local, "region", None) is not None


@contextmanager
def lean_region(enabled: bool = True) -> Iterator[None]:
    """Run a training forward so that registered tensors are saved as recipes (module doc)."""
    if not enabled or active():
        yield
        return
    region = _Region()
    _local.region = region
    try:
        with torch.autograd.graph.saved_tensors_hooks(region.pack, _unpack):
            yield
    finally:
        _local.region = None


def register(t: Tensor, recipe: Recipe) -> Tensor:
    """Save ``recipe`` instead of ``t`` wherever autograd saves ``t`` in this region; return t."""
    region = getattr(_local, "region", None)
    if region is not None:
        region.entries[id(t)] = (weakref.ref(t), recipe)
    return t


# -- BN (training statistics) + ReLU ----------------------------------------------------------


def _bn_relu(y: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, invstd: Tensor) -> Tensor:
    """relu(y·s + t) with s = γ·invstd, t = β − μ·s: the forward's output, recomputed.

    It runs as an inference BN with mean 0, variance 1 and eps 0 (so that the kernel's own
    scale 1/√(1 + 0) = 1 leaves s and t exact): the CPU kernel then evaluates y·s + t exactly
    as the training kernel did (bit for bit in bfloat16; in float32 some shapes differ by one
    rounding), and a few times faster than the same formula through broadcasting ops.
    """
    scale = invstd * weight.to(invstd.dtype)
    shift = bias.to(invstd.dtype) - mean * scale
    zeros, ones = torch.zeros_like(scale), torch.ones_like(scale)
    out = torch.native_batch_norm(y, scale, shift, zeros, ones, False, 0.0, 0.0)[0]
    return out.relu_()


class _BatchNormReLU(torch.autograd.Function):
    """Training-mode BN (batch statistics, running-statistics update) then ReLU; keeps only y."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        y: Tensor,
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
    ) -> Tensor:
        out, mean, invstd = torch.native_batch_norm(
            y, weight, bias, running_mean, running_var, True, momentum, eps
        )
        out = out.relu_()
        ctx.recipe = Recipe(_bn_relu, y, weight, bias, mean, invstd, users=1)
        ctx.stats = (y, weight, mean, invstd, eps)
        return register(out, ctx.recipe)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        y, weight, mean, invstd, eps = ctx.stats
        out = ctx.recipe.take()
        grad = torch.ops.aten.threshold_backward(grad, out, 0)
        del out
        need = ctx.needs_input_grad
        gy, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad, y, weight, None, None, mean, invstd, True, eps, [need[0], need[1], need[2]]
        )
        return gy, gw, gb, None, None, None, None


def _hooked(bn: nn.Module) -> bool:
    """Whether calling ``bn`` would run hooks: its own, or global ones
    (``nn.modules.module.register_module_forward_hook`` and friends).  Such a BN runs as the
    plain module, so that every hook still fires."""
    own = (bn._forward_hooks, bn._forward_pre_hooks, bn._backward_hooks, bn._backward_pre_hooks)
    return any(own) or any(
        getattr(_module, name, None)
        for name in (
            "_global_forward_hooks",
            "_global_forward_pre_hooks",
            "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    )


def _lean_bn(bn: nn.Module, y: Tensor) -> bool:
    """Whether ``bn`` is a plain training BN that :class:`_BatchNormReLU` reproduces exactly."""
    return (
        active()
        and type(bn) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
        and bn.training
        and bn.affine
        and bn.track_running_stats
        and bn.momentum is not None
        and not _hooked(bn)
        and torch.is_grad_enabled()
        and y.dim() >= 2
        and y.numel() * y.element_size() >= MIN_BYTES
    )


def batch_norm_relu(bn: nn.Module, y: Tensor) -> Tensor:
    """``relu(bn(y))``; in a lean region a training BN keeps y only (its output is recomputed)."""
    if not _lean_bn(bn, y):
        return F.relu(bn(y))
    if y.numel() // y.shape[1] <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(y.shape)}"
        )
    bn.num_batches_tracked.add_(1)  # type: ignore[operator]
    return _BatchNormReLU.apply(
        y, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.momentum, bn.eps
    )


# -- max-pool without indices -----------------------------------------------------------------


_WITH_INDICES = {
    2: (torch.ops.aten.max_pool2d_with_indices, torch.ops.aten.max_pool2d_with_indices_backward),
    3: (torch.ops.aten.max_pool3d_with_indices, torch.ops.aten.max_pool3d_with_indices_backward),
}
_FUNCTIONAL = {F.max_pool2d: 2, F.max_pool3d: 3}


def _as_list(value: Any, dim: int) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [int(value)] * dim


def _pool_spec(pool: Any, args: tuple, kwargs: dict, dim: int) -> tuple | None:
    """(kernel, stride, padding, dilation, ceil_mode) of a 2-D/3-D max-pool, else None."""
    if dim not in _WITH_INDICES or args:
        return None
    if isinstance(pool, (nn.MaxPool2d, nn.MaxPool3d)) and not kwargs:
        if pool.return_indices or (dim == 3) != isinstance(pool, nn.MaxPool3d):
            return None
        k, s, p, d, c = pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode
    elif _FUNCTIONAL.get(pool) == dim and set(kwargs) <= {"kernel_size", "stride", "padding"}:
        k = kwargs["kernel_size"]
        s = kwargs.get("stride") or k
        p, d, c = kwargs.get("padding", 0), 1, False
    else:
        return None
    return (_as_list(k, dim), _as_list(s, dim), _as_list(p, dim), _as_list(d, dim), bool(c))


class _MaxPool(torch.autograd.Function):
    """A max-pool that keeps its input, not its int64 argmax; the backward finds it again."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, spec: tuple) -> Tensor:  # type: ignore[override]
        ctx.spec = spec
        ctx.save_for_backward(x)
        return _WITH_INDICES[x.dim() - 2][0](x, *spec)[0]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        pool, pool_backward = _WITH_INDICES[x.dim() - 2]
        indices = pool(x, *ctx.spec)[1]
        return pool_backward(grad, x, *ctx.spec, indices), None


def lean_max_pool(pool: Callable[..., Tensor], x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """``pool(x, *args, **kwargs)`` (a max-pool module or function); in a lean region, with
    gradients, a 2-D/3-D max-pool keeps its input instead of the argmax."""
    big = x.numel() * x.element_size() >= MIN_BYTES
    if big and active() and torch.is_grad_enabled() and x.requires_grad:
        spec = _pool_spec(pool, args, kwargs, x.dim() - 2)
        if spec is not None:
            return _MaxPool.apply(x, spec)
    return pool(x, *args, **kwargs)
