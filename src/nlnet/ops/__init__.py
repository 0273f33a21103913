"""The non-local operation of §3.1–3.2 as pure functions on ``(B, N, d)`` tensors.

``nonlocal_attention`` computes Eq. (1), y_i = 1/C(x) Σ_j f(x_i, x_j) g(x_j), for the four
instantiations of f (Eq. 2–5).  ``backend="explicit"`` builds the (B, Nq, Nk) weights (the
reference); ``backend="auto"`` is exact and never builds them — except a small matrix (≤ 16 MiB)
in CPU training, where plain products are the fastest (see :mod:`nlnet.ops.fast`).
"""

from __future__ import annotations

from typing import Literal, overload

import torch
from torch import Tensor

from nlnet.ops.fast import (
    concatenation_attention,
    dot_product_attention,
    is_tracing,
    softmax_attention,
)
from nlnet.ops.pairwise import (
    PAIRWISE_FUNCTIONS,
    SOFTMAX_FORMS,
    default_scale,
    explicit_nonlocal,
    pairwise_weights,
)

BACKENDS: tuple[str, ...] = ("auto", "explicit")

__all__ = [
    "BACKENDS",
    "PAIRWISE_FUNCTIONS",
    "SOFTMAX_FORMS",
    "default_scale",
    "nonlocal_attention",
    "pairwise_weights",
]


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``value`` and the allowed spellings when it is not one of them."""
    if value not in allowed:
        raise ValueError(
            f"unknown {name} {value!r}; expected one of {', '.join(map(repr, allowed))}"
        )


def _validate(
    theta: Tensor,
    phi: Tensor,
    g: Tensor,
    pairwise: str,
    concat_weight: Tensor | None,
    key_padding_mask: Tensor | None,
    backend: str,
) -> None:
    check_choice("pairwise", pairwise, PAIRWISE_FUNCTIONS)
    check_choice("backend", backend, BACKENDS)
    for name, t in (("theta", theta), ("phi", phi), ("g", g)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(
                f"{name} must have shape (B, N, d) (3 dims), got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    b, _, d = theta.shape
    if phi.shape[0] != b or g.shape[0] != b:
        raise ValueError(
            f"batch sizes differ: theta {tuple(theta.shape)}, phi {tuple(phi.shape)}, g {tuple(g.shape)}"
        )
    if phi.shape[2] != d:
        raise ValueError(
            f"theta and phi must share their last dim d: theta {tuple(theta.shape)}, phi {tuple(phi.shape)}"
        )
    if g.shape[1] != phi.shape[1]:
        raise ValueError(
            f"phi and g must have the same number of keys Nk: phi {tuple(phi.shape)}, g {tuple(g.shape)}"
        )
    if phi.shape[1] == 0:
        raise ValueError("there must be at least one key position (Nk = 0)")
    if pairwise == "concatenation":
        if concat_weight is None:
            raise ValueError("pairwise='concatenation' needs concat_weight (w_f of length 2*d)")
        if concat_weight.numel() != 2 * d:
            raise ValueError(
                f"concat_weight must have 2*d = {2 * d} elements, got shape {tuple(concat_weight.shape)}"
            )
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor, got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (b, phi.shape[1]):
            raise ValueError(
                f"key_padding_mask must have shape (B, Nk) = {(b, phi.shape[1])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if not is_tracing() and bool(key_padding_mask.all(dim=1).any()):
            raise ValueError("key_padding_mask masks every key of some batch element")


@overload
def nonlocal_attention(
    theta: Tensor,
    phi: Tensor,
    g: Tensor,
    *,
    pairwise: str,
    scale: float | None = ...,
    concat_weight: Tensor | None = ...,
    key_padding_mask: Tensor | None = ...,
    backend: str = ...,
    return_attention: Literal[False] = ...,
) -> Tensor: ...
@overload
def nonlocal_attention(
    theta: Tensor,
    phi: Tensor,
    g: Tensor,
    *,
    pairwise: str,
    scale: float | None = ...,
    concat_weight: Tensor | None = ...,
    key_padding_mask: Tensor | None = ...,
    backend: str = ...,
    return_attention: Literal[True],
) -> tuple[Tensor, Tensor]: ...
def nonlocal_attention(
    theta: Tensor,
    phi: Tensor,
    g: Tensor,
    *,
    pairwise: str,
    scale: float | None = None,
    concat_weight: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    backend: str = "auto",
    return_attention: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The generic non-local operation, Eq. (1): y_i = 1/C(x) Σ_j f(θ_i, φ_j) g_j.

    Args:
        theta: queries, shape (B, Nq, d) (θ(x), or x itself for ``gaussian``).
        phi: keys, shape (B, Nk, d) (φ(x̂), or x̂ for ``gaussian``).
        g: values, shape (B, Nk, dv).
        pairwise: ``gaussian`` (Eq. 2), ``embedded_gaussian`` (Eq. 3), ``dot_product`` (Eq. 4) or
            ``concatenation`` (Eq. 5).
        scale: multiplies θᵢᵀφⱼ in the softmax forms; default d^-1/2 for ``embedded_gaussian``
            (the original code) and 1 for ``gaussian`` (the paper).  Ignored by the linear forms.
        concat_weight: w_f, 2·d elements (θ half first), for ``concatenation``.
        key_padding_mask: (B, Nk) bool, True = padding: such keys take no part in f nor in N.
        backend: ``auto`` (exact, never builds the Nq × Nk matrix but a small one in CPU training)
            or ``explicit`` (the reference).
        return_attention: also return the (B, Nq, Nk) weights f/C (forces the explicit path).

    Returns:
        ``y`` of shape (B, Nq, dv), or ``(y, weights)`` when ``return_attention``.
    """
    _validate(theta, phi, g, pairwise, concat_weight, key_padding_mask, backend)
    if scale is None:
        scale = default_scale(pairwise, theta.shape[-1])
    if backend == "explicit" or return_attention:
        y, weights = explicit_nonlocal(
            theta,
            phi,
            g,
            pairwise=pairwise,
            scale=scale,
            concat_weight=concat_weight,
            key_padding_mask=key_padding_mask,
        )
        return (y, weights) if return_attention else y
    if pairwise in SOFTMAX_FORMS:
        return softmax_attention(theta, phi, g, scale=scale, key_padding_mask=key_padding_mask)
    if pairwise == "dot_product":
        return dot_product_attention(theta, phi, g, key_padding_mask=key_padding_mask)
    assert concat_weight is not None
    return concatenation_attention(
        theta, phi, g, concat_weight=concat_weight, key_padding_mask=key_padding_mask
    )
