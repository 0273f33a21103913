"""The fast eval forward of the video ResNets and NL blocks: BN folded, channels-last.

A network in eval mode with autograd off (``model.eval()`` + ``torch.no_grad()`` /
``torch.inference_mode()``, what ``nlnet eval`` and prediction do) computes every
conv → BN (→ + shortcut) (→ ReLU) of the backbone as ONE convolution:

* **BN folding.** In eval mode a BatchNorm (or :class:`~nlnet.models.resnet.FrozenBatchNorm`) is
  the per-channel affine y = s·x + t with s = γ/√(σ²+ε), t = β − μ·s (§4.1: the statistics are
  frozen at test time), so conv(x, W) → BN equals conv(x, s·W) + t.  The folded weights are
  computed in float64 and cached per convolution; the cache is rebuilt when a conv weight is
  replaced or updated in place (``load_state_dict``, an optimizer step, ``.to()``) and when any BN
  value changes (compared by value, so running statistics updated by a training forward are
  seen).  Parameter names and ``state_dict`` are untouched: the model's own tensors are never
  modified.
* **Memory format.** Activations are kept in ``torch.channels_last_3d`` end to end.  On CPU the
  convolutions then go to oneDNN (``mkldnn._convolution_pointwise``) with the bias, the residual
  addition and the ReLU fused into the kernel and the weights pre-packed once per input shape;
  PyTorch's default for a batch-1 contiguous clip is its reference ``slow_conv3d`` for most
  layers, plus separate BN, ReLU and add passes over memory.  Elsewhere (CUDA, autocast, float64)
  the folded convolution is a plain ``F.conv3d`` (cuDNN picks channels-last kernels itself).

The non-local block (§3.3) takes the same path for its θ/φ/g embeddings and for W_z + BN + the
residual (Eq. 6) as one convolution.  The result equals the layer-by-layer forward up to float
rounding (≈1e-7 relative in float32, 1e-15 in float64; ``tests/test_fuse.py``).  Training, and
any forward with autograd on, runs the plain modules.  ``model.fast_inference = False`` (on the
network or on one block) turns the fast path off.

This module sits next to :mod:`nlnet.ops` (it depends on nothing above it), so that :mod:`nlnet.block` and :mod:`nlnet.models` both use it.

Caveat: weights changed through ``.data`` (which hides the change from PyTorch's version
counter) are not seen by the weight cache; call :func:`clear_cache` after such an edit.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlnet.ops.fast import is_tracing

_CL = torch.channels_last_3d
_MAX_PACKED_SHAPES = 8


@dataclass
class _Folded:
    """The folded weight/bias of one conv (+ BN), with what they were computed from."""

    weight_key: tuple
    bn_state: tuple[Tensor, ...]
    weight: Tensor | None  # dropped once packed for oneDNN (refolded for a new input shape)
    bias: Tensor
    packed: dict[tuple, Tensor] = field(default_factory=dict)  # (*input shape, dtype)


_CACHE: weakref.WeakKeyDictionary[nn.Module, _Folded] = weakref.WeakKeyDictionary()


def clear_cache(model: nn.Module | None = None) -> None:
    """Forget the folded weights of ``model``'s convolutions (all models when ``None``)."""
    if model is None:
        _CACHE.clear()
        return
    for m in model.modules():
        _CACHE.pop(m, None)


def _bn_tensors(bn: nn.Module | None) -> tuple[Tensor, ...]:
    if bn is None:
        return ()
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"cannot fold {bn}: it tracks no running statistics")
        out = [bn.running_mean, bn.running_var]
        if bn.affine:
            out += [bn.weight, bn.bias]
        return tuple(t.detach() for t in out)
    return (bn.weight.detach(), bn.bias.detach())  # FrozenBatchNorm: a fixed affine


def fold_batch_norm(conv: nn.modules.conv._ConvNd, bn: nn.Module | None) -> tuple[Tensor, Tensor]:
    """(W', b') with conv(x, W') + b' = BN(conv(x)) for a BN in eval mode (or a frozen BN).

    Computed in float64 (where the device has it) and returned in the conv weight's dtype.
    """
    w = conv.weight.detach()
    acc = torch.float64 if w.device.type in ("cpu", "cuda") else torch.float32
    if bn is None:
        bias = conv.bias.detach() if conv.bias is not None else w.new_zeros(w.shape[0])
        return w, bias
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        scale = torch.rsqrt(bn.running_var.detach().to(acc) + bn.eps)
        if bn.affine:
            scale = scale * bn.weight.detach().to(acc)
        shift = -bn.running_mean.detach().to(acc) * scale
        if bn.affine:
            shift = shift + bn.bias.detach().to(acc)
    else:  # FrozenBatchNorm: y = x·weight + bias
        scale, shift = bn.weight.detach().to(acc), bn.bias.detach().to(acc)
    if conv.bias is not None:
        shift = shift + conv.bias.detach().to(acc) * scale
    weight = (w.to(acc) * scale.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
    return weight, shift.to(w.dtype)


def _weight_key(conv: nn.modules.conv._ConvNd) -> tuple:
    keys = []
    for t in (conv.weight, conv.bias):
        if t is not None:
            keys.append((id(t), t.data_ptr(), t._version, t.dtype, t.device))
    return tuple(keys)


def _folded(conv: nn.modules.conv._ConvNd, bn: nn.Module | None) -> _Folded:
    entry = _CACHE.get(conv)
    key = _weight_key(conv)
    state = _bn_tensors(bn)
    if (
        entry is not None
        and entry.weight_key == key
        and len(entry.bn_state) == len(state)
        and all(
            a.shape == b.shape and a.device == b.device and torch.equal(a, b)
            for a, b in zip(entry.bn_state, state)
        )
    ):
        return entry
    weight, bias = _fold(conv, bn)
    entry = _Folded(key, tuple(t.clone() for t in state), weight, bias)
    _CACHE[conv] = entry
    return entry


def _fold(conv: nn.modules.conv._ConvNd, bn: nn.Module | None) -> tuple[Tensor, Tensor]:
    weight, bias = fold_batch_norm(conv, bn)
    if weight.dim() == 5:
        weight = weight.contiguous(memory_format=_CL)  # the activations' layout
    return weight, bias


def _dense_weight(entry: _Folded, conv: nn.modules.conv._ConvNd, bn: nn.Module | None) -> Tensor:
    return entry.weight if entry.weight is not None else _fold(conv, bn)[0]


def _onednn_dtype(x: Tensor, conv: nn.modules.conv._ConvNd) -> torch.dtype | None:
    """The dtype oneDNN computes ``conv`` on ``x`` in, or ``None`` to leave it to PyTorch.

    float32 (or bfloat16) like the weights; under ``torch.autocast("cpu", dtype=bfloat16)``
    bfloat16, as autocast would run the convolution (AMX / AVX-512 BF16 kernels).
    """
    if not (
        x.device.type == "cpu"
        and x.dim() == 5
        and isinstance(conv, nn.Conv3d)
        and not isinstance(conv.padding, str)  # "same"/"valid": leave them to PyTorch
        and conv.padding_mode == "zeros"
        and torch.backends.mkldnn.enabled
        and torch.backends.mkldnn.is_available()
    ):
        return None
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16 or x.dtype not in (
            torch.float32,
            torch.bfloat16,
        ):
            return None
        dtype = torch.bfloat16
    elif x.dtype in (torch.float32, torch.bfloat16) and conv.weight.dtype == x.dtype:
        dtype = x.dtype
    else:
        return None
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return dtype


def channels_last(x: Tensor) -> Tensor:
    """``x`` in ``channels_last_3d`` memory format (a no-op when it already is)."""
    return x.contiguous(memory_format=_CL) if x.dim() == 5 else x


def conv_bn(
    conv: nn.modules.conv._ConvNd,
    bn: nn.Module | None,
    x: Tensor,
    *,
    relu: bool = False,
    residual: Tensor | None = None,
) -> Tensor:
    """ReLU?(BN(conv(x)) + residual?) as one folded convolution (inference only)."""
    entry = _folded(conv, bn)
    padding, stride, dilation = list(conv.padding), list(conv.stride), list(conv.dilation)
    dtype = _onednn_dtype(x, conv)
    if dtype is not None:
        x = channels_last(x).to(dtype)
        key = (*x.shape, dtype)
        weight = entry.packed.get(key)
        if weight is None:
            if len(entry.packed) >= _MAX_PACKED_SHAPES:
                entry.packed.clear()
            dense = _dense_weight(entry, conv, bn).to(dtype)
            weight = torch.ops.mkldnn._reorder_convolution_weight(
                dense, padding, stride, dilation, conv.groups, list(x.shape)
            )
            entry.packed[key] = weight
            entry.weight = None  # one copy of the folded weights in memory, not two
        bias = entry.bias if entry.bias.dtype == dtype else entry.bias.to(dtype)
        if residual is not None:
            return torch.ops.mkldnn._convolution_pointwise.binary(
                x,
                channels_last(residual).to(dtype),
                weight,
                bias,
                padding,
                stride,
                dilation,
                conv.groups,
                "add",
                None,
                "relu" if relu else None,
                [],
                None,
            )
        return torch.ops.mkldnn._convolution_pointwise(
            x,
            weight,
            bias,
            padding,
            stride,
            dilation,
            conv.groups,
            "relu" if relu else "none",
            [],
            None,
        )
    if x.device.type == "cuda":
        x = channels_last(x)  # cuDNN's channels-last kernels (bf16/fp16 tensor cores)
    y = conv._conv_forward(x, _dense_weight(entry, conv, bn), entry.bias)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def enabled(model: nn.Module, x: Tensor) -> bool:
    """Whether ``model``'s forward on ``x`` takes the fast inference path.

    Only with autograd off, on CPU or CUDA, not while tracing or compiling, with every
    sub-module in eval mode (BN then uses its
    running statistics), no forward hook anywhere (hooks, e.g. ``FlopCounterMode``'s or a
    feature extractor's, see the plain modules run) and ``model.fast_inference`` not ``False``.
    """
    if (
        not getattr(model, "fast_inference", True)
        or torch.is_grad_enabled()
        or not x.is_floating_point()
        or x.device.type not in ("cpu", "cuda")
        or is_tracing()  # torch.compile / export / ONNX / TorchScript see the plain modules
        or _global_hooks()
    ):
        return False
    return not any(m.training or m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _global_hooks() -> bool:
    from torch.nn.modules import module

    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)
