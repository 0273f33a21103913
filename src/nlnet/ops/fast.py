"""Exact non-local operation without the (Nq × Nk) matrix (``backend="auto"``).

* Softmax forms (Eq. 2–3): PyTorch's fused ``scaled_dot_product_attention`` (flash /
  memory-efficient kernels on CPU and CUDA), which never materialises the affinity.
* Dot product (Eq. 4): matrix products are associative, so (θφᵀ/N)·g = θ·(φᵀg)/N.  That is
  O(N·d·dv) instead of O(Nq·Nk·d) and needs only a d × dv intermediate.
* Concatenation (Eq. 5): w_fᵀ[θᵢ, φⱼ] = aᵢ + bⱼ.  With the keys sorted by bⱼ (descending), the keys
  where aᵢ + bⱼ > 0 are a prefix of that order whose length kᵢ a binary search finds, so
  Σⱼ ReLU(aᵢ + bⱼ) gⱼ = aᵢ·G[kᵢ] + BG[kᵢ] with G, BG the prefix sums of g and b·g.
  O(N log N + N·dv), differentiable through autograd (sort and search only produce indices).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from nlnet.ops.pairwise import concat_projections, valid_key_count, widen


def _autocast_off(t: Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


def softmax_attention(
    theta: Tensor,
    phi: Tensor,
    g: Tensor,
    *,
    scale: float,
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """softmax(scale·θφᵀ)·g (Eq. 2–3) with the fused kernel; padded keys are excluded."""
    attn_mask = None
    if key_padding_mask is not None:
        # SDPA's boolean mask is True where attention is *allowed*: (B, 1, 1, Nk) broadcasts.
        attn_mask = (~key_padding_mask)[:, None, None, :]
    q, k, v = theta.unsqueeze(1), phi.unsqueeze(1), g.unsqueeze(1)
    if q.dtype != v.dtype or k.dtype != v.dtype:  # e.g. mixed inputs under autocast
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return y.squeeze(1)


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
        g_acc = g_w.to(acc)
        b_acc = b.to(acc)
        sort_key = -b.detach()  # ascending in -b  <=>  descending in b
        if key_padding_mask is not None:
            # Padded keys sort last (+inf never satisfies c < a) and contribute zeros.
            sort_key = sort_key.masked_fill(key_padding_mask, float("inf"))
            g_acc = g_acc.masked_fill(key_padding_mask[:, :, None], 0.0)
            b_acc = b_acc.masked_fill(key_padding_mask, 0.0)
        c_sorted, order = torch.sort(sort_key, dim=1)
        g_sorted = torch.gather(g_acc, 1, order[:, :, None].expand_as(g_acc))
        b_sorted = torch.gather(b_acc, 1, order)
        # Prefix sums with a leading zero row: G[k] = Σ_{r<k} g_(r).
        zeros = g_sorted.new_zeros(g_sorted.shape[0], 1, g_sorted.shape[2])
        prefix_g = torch.cat([zeros, torch.cumsum(g_sorted, dim=1)], dim=1)
        prefix_bg = torch.cat([zeros, torch.cumsum(b_sorted[:, :, None] * g_sorted, dim=1)], dim=1)
        # kᵢ = #{j : bⱼ > -aᵢ} = #{j : cⱼ < aᵢ} with c = -b sorted ascending.
        k = torch.searchsorted(c_sorted.contiguous(), a.detach().contiguous(), side="left")
        idx = k[:, :, None].expand(-1, -1, g_sorted.shape[2])
        y = a.to(acc)[:, :, None] * torch.gather(prefix_g, 1, idx) + torch.gather(prefix_bg, 1, idx)
        y = y / valid_key_count(key_padding_mask, nk, y)
    return y.to(out_dtype)
