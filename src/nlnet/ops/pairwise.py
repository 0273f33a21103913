"""The four pairwise functions f and normalisers C(x) of §3.2, computed explicitly.

This module is the *reference*: it builds the (B, Nq, Nk) matrix of weights f(x_i, x_j)/C(x) and
multiplies it with g.  It is what ``backend="explicit"`` and ``return_attention=True`` use, and what
the fast algorithms in :mod:`nlnet.ops.fast` are tested against.

=================== ================================ ===========================  =========
``pairwise``        f(x_i, x_j)                      C(x)                         paper
=================== ================================ ===========================  =========
gaussian            exp(s · x_iᵀ x_j)                Σ_j f                        Eq. (2)
embedded_gaussian   exp(s · θ(x_i)ᵀ φ(x_j))          Σ_j f                        Eq. (3)
dot_product         θ(x_i)ᵀ φ(x_j)                   N (number of valid keys)     Eq. (4)
concatenation       ReLU(w_fᵀ [θ(x_i), φ(x_j)])      N (number of valid keys)     Eq. (5)
=================== ================================ ===========================  =========

For the Gaussian forms the caller passes the raw features as ``theta``/``phi``; the operation does
not care whether an embedding was applied.
"""

from __future__ import annotations

import torch
from torch import Tensor

PAIRWISE_FUNCTIONS: tuple[str, ...] = (
    "gaussian",
    "embedded_gaussian",
    "dot_product",
    "concatenation",
)
SOFTMAX_FORMS: frozenset[str] = frozenset({"gaussian", "embedded_gaussian"})


def default_scale(pairwise: str, d: int) -> float:
    """The scale applied to θᵢᵀφⱼ before the softmax.

    ``embedded_gaussian`` defaults to d^-1/2 (the original code's ``NONLOCAL.USE_SCALE``, on in
    every released model); ``gaussian`` to 1 (Eq. 2 as printed).  The linear forms ignore it.
    """
    if pairwise == "embedded_gaussian":
        return d**-0.5
    return 1.0


def widen(t: Tensor) -> Tensor:
    """Promote half-precision tensors to float32; leave float32/float64 unchanged."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def valid_key_count(key_padding_mask: Tensor | None, nk: int, like: Tensor) -> Tensor:
    """N of Eq. (4)/(5): the number of keys that are not padding, shaped (B, 1, 1)."""
    if key_padding_mask is None:
        return torch.full((1, 1, 1), float(nk), dtype=like.dtype, device=like.device)
    count = (~key_padding_mask).sum(dim=1).to(like.dtype)
    return count.clamp_min(1.0).view(-1, 1, 1)


def concat_projections(theta: Tensor, phi: Tensor, concat_weight: Tensor) -> tuple[Tensor, Tensor]:
    """Split w_fᵀ[θᵢ, φⱼ] into aᵢ + bⱼ with aᵢ = w_θᵀθᵢ, bⱼ = w_φᵀφⱼ (Eq. 5).

    Returns ``a`` of shape (B, Nq) and ``b`` of shape (B, Nk).
    """
    d = theta.shape[-1]
    w = concat_weight.reshape(-1).to(theta.dtype)
    # (B, N, d) @ (d, 1) rather than @ (d,): torch 2.14's ONNX exporter mistranslates a
    # matrix-vector product of a transposed (B, C, N) view.
    a = (theta @ w[:d, None])[..., 0]
    b = (phi @ w[d:, None])[..., 0]
    return a, b


def pairwise_weights(
    theta: Tensor,
    phi: Tensor,
    *,
    pairwise: str,
    scale: float,
    concat_weight: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """The explicit matrix f(x_i, x_j)/C(x), shape (B, Nq, Nk) (Eq. 1–5).

    Rows of the softmax forms sum to 1 over the valid keys; padded keys get weight 0.  The
    exponentials and their normaliser are evaluated in float32 (or wider) even under autocast, so
    neither overflows in bf16/fp16.
    """
    nk = phi.shape[1]
    if pairwise in SOFTMAX_FORMS:
        logits = widen(torch.bmm(theta, phi.transpose(1, 2))) * scale
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, :], float("-inf"))
        weights = torch.softmax(logits, dim=-1)
    elif pairwise == "dot_product":
        weights = widen(torch.bmm(theta, phi.transpose(1, 2)))
        weights = weights / valid_key_count(key_padding_mask, nk, weights)
        if key_padding_mask is not None:
            weights = weights.masked_fill(key_padding_mask[:, None, :], 0.0)
    elif pairwise == "concatenation":
        assert concat_weight is not None
        a, b = concat_projections(widen(theta), widen(phi), concat_weight)
        weights = torch.relu(a[:, :, None] + b[:, None, :])
        weights = weights / valid_key_count(key_padding_mask, nk, weights)
        if key_padding_mask is not None:
            weights = weights.masked_fill(key_padding_mask[:, None, :], 0.0)
    else:  # validated by the caller
        raise ValueError(
            f"unknown pairwise function {pairwise!r}; expected one of {PAIRWISE_FUNCTIONS}"
        )
    return weights


def explicit_nonlocal(
    theta: Tensor,
    phi: Tensor,
    g: Tensor,
    *,
    pairwise: str,
    scale: float,
    concat_weight: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Eq. (1) with the weights built explicitly; returns ``(y, weights)``.

    Under autocast the reference is computed in float32 (it is the yardstick, not the fast path);
    ``y`` is returned in ``g``'s dtype.
    """
    with torch.autocast(device_type=theta.device.type, enabled=False):
        weights = pairwise_weights(
            widen(theta),
            widen(phi),
            pairwise=pairwise,
            scale=scale,
            concat_weight=concat_weight,
            key_padding_mask=key_padding_mask,
        )
        y = torch.bmm(weights, widen(g).to(weights.dtype))
    return y.to(g.dtype), weights
