"""The non-local block of §3.3: z = W_z·y + x (Eq. 6) for sequences, images and videos.

Parameter names are a checkpoint contract (converters and released weights rely on them):

====================  ===========================================================  ==============
name                  what it is                                                  present when
====================  ===========================================================  ==============
``theta.{weight,bias}``  1×1 conv W_θ, C → inner                                   not gaussian
``phi.{weight,bias}``    1×1 conv W_φ, C → inner                                   not gaussian
``g.{weight,bias}``      1×1 conv W_g, C → inner                                   always
``concat_weight``        w_f of Eq. (5), shape (2·inner,), θ half first            concatenation
``out.{weight,bias}``    1×1 conv W_z, inner → C                                   always
``bn.*``                 BatchNorm after W_z (γ = 0 at init)                        norm="batch"
====================  ===========================================================  ==============

For ``gaussian`` (Eq. 2) there is no θ/φ embedding: f compares the raw features x_i and x̂_j.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlnet import fuse
from nlnet.geometry import EXTENTS, attention_problems
from nlnet.ops import PAIRWISE_FUNCTIONS, check_choice, nonlocal_attention
from nlnet.ops.layout import memory_format
from nlnet.ops.pooling import max_pool

NORMS: tuple[str | None, ...] = ("batch", None)

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_DEFAULT_SUBSAMPLE = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}
_RANK_NAMES = {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, T, H, W)"}


def _to5d(t: Tensor, dim: int) -> Tensor:
    """View a (B, C, *spatial) tensor as (B, C, T, H, W) with singleton axes for 1D/2D."""
    if dim == 1:
        return t[:, :, None, None, :]
    if dim == 2:
        return t[:, :, None, :, :]
    return t


def _mask5d(mask: Tensor, dim: int) -> Tensor:
    return _to5d(mask[:, None], dim)[:, 0]


@dataclass(frozen=True)
class _Layout:
    """How (B, C, T, H, W) query/key grids are cut into independent attention problems."""

    extent: str
    temporal_groups: int | None

    def queries(self, q: Tensor) -> Tensor:
        b, c, t, h, w = q.shape
        n, nq, _ = attention_problems(self.extent, self.temporal_groups, (t, h, w), (t, h, w))
        if self.extent == "space":
            return q.permute(0, 2, 3, 4, 1).reshape(b * n, nq, c)
        if self.extent == "time":
            return q.permute(0, 3, 4, 2, 1).reshape(b * n, nq, c)
        if self.temporal_groups:
            q = q.reshape(b, c, n, t // n, h, w).permute(0, 2, 3, 4, 5, 1)
            return q.reshape(b * n, nq, c)
        return q.flatten(2).transpose(1, 2)

    def keys(self, k5: Tensor, query_thw: tuple[int, ...], pool: tuple[int, int, int]) -> Tensor:
        """Arrange keys/values (B, C, Tk, Hk, Wk) to match :meth:`queries` (or a (B, Tk, Hk, Wk) mask)."""
        is_mask = k5.dim() == 4
        if is_mask:
            k5 = k5[:, None]
        b, c, t, h, w = k5.shape
        n, _, nk = attention_problems(self.extent, self.temporal_groups, query_thw, (t, h, w))
        if self.extent == "space":
            out = k5.permute(0, 2, 3, 4, 1).reshape(b * n, nk, c)
        elif self.extent == "time":
            # A query at (h, w) attends, in every frame, to the key cell that pooled its position.
            qh, qw = query_thw[1], query_thw[2]
            ih = (torch.arange(qh, device=k5.device) // pool[1]).clamp_max(h - 1)
            iw = (torch.arange(qw, device=k5.device) // pool[2]).clamp_max(w - 1)
            k5 = k5.index_select(3, ih).index_select(4, iw)
            out = k5.permute(0, 3, 4, 2, 1).reshape(b * n, nk, c)
        elif self.temporal_groups:
            out = k5.reshape(b, c, n, t // n, h, w).permute(0, 2, 3, 4, 5, 1)
            out = out.reshape(b * n, nk, c)
        else:
            out = k5.flatten(2).transpose(1, 2)
        return out[..., 0] if is_mask else out

    def restore(self, y: Tensor, shape: tuple[int, int, int, int, int]) -> Tensor:
        """Inverse of :meth:`queries` for the output y: back to (B, C, T, H, W)."""
        b, c, t, h, w = shape
        if self.extent == "space":
            return y.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        if self.extent == "time":
            return y.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2)
        if self.temporal_groups:
            k = self.temporal_groups
            return y.reshape(b, t // k, k, h, w, c).permute(0, 5, 1, 2, 3, 4).reshape(b, c, t, h, w)
        return y.transpose(1, 2).reshape(b, c, t, h, w)


class NonLocalBlock(nn.Module):
    """Non-local block (§3.3, Eq. 6): z = BN(W_z · NL(x)) + x.

    Args:
        in_channels: C of the input.
        dim: 1, 2 or 3 for inputs (B, C, L), (B, C, H, W) or (B, C, T, H, W).
        pairwise: f of §3.2: ``embedded_gaussian`` (default, the paper's), ``gaussian``,
            ``dot_product`` or ``concatenation``.
        inner_channels: width of θ, φ, g (the bottleneck); default C // 2.
        subsample: max-pool on the key/value side (x̂ of §3.3): ``True`` for the default kernel
            (2, 2×2 or 1×2×2, stride = kernel), a tuple for another kernel, ``False`` for none.
        extent: ``spacetime`` (all positions), ``space`` (within each frame) or ``time`` (within
            each spatial location) — Table 2d.  ``space``/``time`` need ``dim=3``.
        temporal_groups: attend only within groups of this many consecutive frames (the original
            code's res3 blocks in its 128-frame models).
        norm: ``"batch"`` (BN after W_z, γ = 0 at init) or ``None`` (the frozen-BN models; then
            W_z itself starts at 0 when ``zero_init``).
        zero_init: start as an exact identity (γ = 0, or W_z = 0 without a norm).
        scale: softmax scale; default d^-1/2 for embedded Gaussian (original code), 1 for Gaussian.
        pool_before_conv: ``True`` pools x before φ and g (the original code; needed for its
            weights); ``False`` pools after them (the paper's text, AlexHex7, mmcv).
        init_std: std of the Gaussian init of θ/φ/g/W_z (and w_f); biases start at 0.
        backend: ``auto`` (exact, no Nq × Nk matrix) or ``explicit``.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        dim: int = 3,
        pairwise: str = "embedded_gaussian",
        inner_channels: int | None = None,
        subsample: bool | int | Sequence[int] = True,
        extent: str = "spacetime",
        temporal_groups: int | None = None,
        norm: str | None = "batch",
        zero_init: bool = True,
        scale: float | None = None,
        pool_before_conv: bool = True,
        init_std: float = 0.01,
        backend: str = "auto",
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.dim = dim
        self.pairwise = pairwise
        self.extent = extent
        self.temporal_groups = temporal_groups
        self.norm = norm
        self.zero_init = zero_init
        self.scale = scale
        self.pool_before_conv = pool_before_conv
        self.init_std = init_std
        self.backend = backend
        self.fast_inference = True  # eval + no autograd: 1×1 convs through nlnet.fuse
        inner, self.subsample = self._check_arguments(inner_channels, subsample)
        self.inner_channels = inner
        conv = _CONV[dim]
        if pairwise != "gaussian":
            self.theta = conv(in_channels, inner, 1, **factory)
            self.phi = conv(in_channels, inner, 1, **factory)
        self.g = conv(in_channels, inner, 1, **factory)
        if pairwise == "concatenation":
            self.concat_weight = nn.Parameter(torch.empty(2 * inner, **factory))
        self.out = conv(inner, in_channels, 1, **factory)
        if norm == "batch":
            self.bn = _BN[dim](in_channels, eps=bn_eps, momentum=bn_momentum, **factory)
        self.reset_parameters()

    def _check_arguments(
        self, inner_channels: int | None, subsample: bool | int | Sequence[int]
    ) -> tuple[int, tuple[int, ...] | None]:
        """Reject inconsistent settings, naming the value; return (inner width, pool kernel)."""
        dim, extent, groups = self.dim, self.extent, self.temporal_groups
        if dim not in (1, 2, 3):
            raise ValueError(f"dim must be 1, 2 or 3, got {dim!r}")
        if not isinstance(self.in_channels, int) or self.in_channels <= 0:
            raise ValueError(f"in_channels must be a positive int, got {self.in_channels!r}")
        check_choice("pairwise", self.pairwise, PAIRWISE_FUNCTIONS)
        check_choice("extent", extent, EXTENTS)
        check_choice("backend", self.backend, ("auto", "explicit"))
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; expected 'batch' or None")
        if extent != "spacetime" and dim != 3:
            raise ValueError(f"extent={extent!r} needs a video block (dim=3), got dim={dim}")
        if groups is not None:
            if dim != 3 or extent != "spacetime":
                raise ValueError("temporal_groups needs dim=3 and extent='spacetime'")
            if not isinstance(groups, int) or groups <= 0:
                raise ValueError(f"temporal_groups must be a positive int, got {groups!r}")
        inner = self.in_channels // 2 if inner_channels is None else inner_channels
        if not isinstance(inner, int) or inner <= 0:
            raise ValueError(f"inner_channels must be a positive int, got {inner_channels!r}")
        kernel = self._pool_kernel(subsample, dim)
        if groups is not None and kernel is not None and groups % kernel[0]:
            raise ValueError(
                f"temporal_groups={groups} must be a multiple of the temporal sub-sampling {kernel[0]}"
            )
        if extent == "space" and kernel is not None and kernel[0] != 1:
            raise ValueError("extent='space' cannot sub-sample time (subsample[0] must be 1)")
        return inner, kernel

    @staticmethod
    def _pool_kernel(subsample: bool | int | Sequence[int], dim: int) -> tuple[int, ...] | None:
        if subsample is False or subsample is None:
            return None
        if subsample is True:
            return _DEFAULT_SUBSAMPLE[dim]
        kernel = (subsample,) * dim if isinstance(subsample, int) else tuple(subsample)
        if len(kernel) != dim or any(not isinstance(k, int) or k < 1 for k in kernel):
            raise ValueError(
                f"subsample must be True, False or {dim} positive ints for dim={dim}, got {subsample!r}"
            )
        return None if all(k == 1 for k in kernel) else kernel

    def reset_parameters(self) -> None:
        """The original code's init: N(0, init_std) weights, zero biases; identity at start."""
        for name in ("theta", "phi", "g", "out"):
            layer = getattr(self, name, None)
            if layer is not None:
                nn.init.normal_(layer.weight, std=self.init_std)
                nn.init.zeros_(layer.bias)
        if self.pairwise == "concatenation":
            nn.init.normal_(self.concat_weight, std=self.init_std)
        if self.norm == "batch":
            self.bn.reset_running_stats()
            nn.init.constant_(self.bn.weight, 0.0 if self.zero_init else 1.0)
            nn.init.zeros_(self.bn.bias)
        elif self.zero_init:
            nn.init.zeros_(self.out.weight)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, dim={self.dim}, pairwise={self.pairwise!r}, "
            f"inner_channels={self.inner_channels}, subsample={self.subsample}, "
            f"extent={self.extent!r}, temporal_groups={self.temporal_groups}, norm={self.norm!r}, "
            f"pool_before_conv={self.pool_before_conv}, backend={self.backend!r}"
        )

    # -- helpers -------------------------------------------------------------------------------
    def _pool(self, t: Tensor) -> Tensor:
        if self.subsample is None:
            return t
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[self.dim - 1]
        return max_pool(pool, t, kernel_size=self.subsample, stride=self.subsample)

    def _pool_keys(self, t: Tensor, mask: Tensor | None) -> Tensor:
        """Sub-sample the key/value side (x̂ of §3.3) so that padding never wins a max.

        Padded positions are set to -inf before the max-pool, so a pooled cell sees only real
        positions; cells made of padding alone (masked by :meth:`_pool_mask`) are set to 0.
        """
        if self.subsample is None:
            return t
        if mask is None:
            return self._pool(t)
        pooled = self._pool(t.masked_fill(mask[:, None], float("-inf")))
        return pooled.masked_fill(self._pool_mask(mask)[:, None], 0.0)

    def _pool_mask(self, mask: Tensor) -> Tensor:
        """A pooled key is padding when every position it pools from is padding."""
        if self.subsample is None:
            return mask
        valid = self._pool((~mask)[:, None].to(torch.float32))[:, 0]
        return valid == 0

    def _check_input(self, x: Tensor, mask: Tensor | None) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor input, got {type(x).__name__}")
        if x.dim() != self.dim + 2:
            raise ValueError(
                f"NonLocalBlock(dim={self.dim}) expects input {_RANK_NAMES[self.dim]} "
                f"({self.dim + 2} dims), got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        if self.subsample is not None and any(
            s < k for s, k in zip(x.shape[2:], self.subsample, strict=True)
        ):
            raise ValueError(
                f"input extent {tuple(x.shape[2:])} is smaller than the sub-sampling kernel "
                f"{self.subsample}; use subsample=False for such small inputs"
            )
        if self.temporal_groups is not None and x.shape[2] % self.temporal_groups:
            raise ValueError(
                f"temporal_groups={self.temporal_groups} must divide the number of frames T={x.shape[2]}"
            )
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != (x.shape[0], *x.shape[2:]):
                raise ValueError(
                    f"key_padding_mask must be a bool tensor of shape (B, *spatial) = "
                    f"{(x.shape[0], *x.shape[2:])}, got {mask.dtype} {tuple(mask.shape)}"
                )

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        *,
        return_attention: bool = False,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """z = W_z·y + x (Eq. 6).

        Args:
            x: (B, C, L), (B, C, H, W) or (B, C, T, H, W).
            return_attention: also return the weights f/C as (B', Nq, Nk): B' = B for
                ``spacetime`` (B·T/k with ``temporal_groups=k``), B·T for ``space``, B·H·W for
                ``time``; queries and (sub-sampled) keys in row-major (T, H, W) order.
            key_padding_mask: optional (B, *spatial) bool, True where x is padding (e.g. a padded
                detection batch).  Padded positions are excluded from the keys: they never win
                a sub-sampling max, and a pooled key made only of padding is masked.  Outputs at
                padded query positions are computed but meaningless (a query whose every key
                is padding, e.g. a padded location with ``extent='time'``, attends to those
                keys unmasked).
        """
        self._check_input(x, key_padding_mask)
        # Eval with autograd off: the 1×1 convs through nlnet.fuse (channels-last, and W_z with
        # its BN and the residual as one convolution); the same values up to float rounding.
        fast = fuse.enabled(self, x)
        theta, phi, g = self._embed(x, key_padding_mask, fast)
        y, weights = self._attend(theta, phi, g, key_padding_mask, return_attention)
        z = self._project(y, x, fast)
        return (z, weights) if return_attention else z

    def _embed(self, x: Tensor, mask: Tensor | None, fast: bool) -> tuple[Tensor, Tensor, Tensor]:
        """θ(x), φ(x̂), g(x̂) of Eqs. 2–5 as 1×1 convs; x̂ = x max-pooled (sub-sampling, §3.3)."""

        def embed(layer: nn.Module, t: Tensor) -> Tensor:
            return fuse.conv_bn(layer, None, t) if fast else layer(t)

        plain = self.pairwise == "gaussian"
        if self.pool_before_conv:  # the original code: x̂ = pool(x), then φ(x̂), g(x̂)
            kv = self._pool_keys(x, mask)
            phi = kv if plain else embed(self.phi, kv)
            g = embed(self.g, kv)
        else:  # the paper's text: pool(φ(x)), pool(g(x))
            phi = self._pool_keys(x if plain else embed(self.phi, x), mask)
            g = self._pool_keys(embed(self.g, x), mask)
        return (x if plain else embed(self.theta, x)), phi, g

    def _attend(
        self, theta: Tensor, phi: Tensor, g: Tensor, mask: Tensor | None, return_attention: bool
    ) -> tuple[Tensor, Tensor | None]:
        """y_i = 1/C(x) Σ_j f(x_i, x_j) g(x_j) (Eq. 1) per ``extent`` problem; y like θ, and f/C."""
        layout = _Layout(self.extent, self.temporal_groups)
        pool3 = _to5d_kernel(self.subsample, self.dim)
        q5 = _to5d(theta, self.dim)
        query_thw = tuple(q5.shape[2:])
        k = layout.keys(_to5d(phi, self.dim), query_thw, pool3)
        v = layout.keys(_to5d(g, self.dim), query_thw, pool3)
        if mask is not None:
            mask = layout.keys(_mask5d(self._pool_mask(mask), self.dim), query_thw, pool3)
            # With extent space/time/groups a row of keys can be all padding (e.g. a padded
            # location for 'time'); its queries are padding too, so let them see those keys
            # rather than divide by zero.  Tensor ops only: no host sync, traceable.
            mask = mask & ~mask.all(dim=1, keepdim=True)
        result = nonlocal_attention(
            layout.queries(q5),
            k,
            v,
            pairwise=self.pairwise,
            scale=self.scale,
            concat_weight=getattr(self, "concat_weight", None),
            key_padding_mask=mask,
            backend=self.backend,
            return_attention=return_attention,
        )
        y, weights = result if return_attention else (result, None)
        y5 = layout.restore(y, (q5.shape[0], g.shape[1], *query_thw))
        return y5.reshape(y5.shape[0], y5.shape[1], *theta.shape[2:]), weights

    def _project(self, y: Tensor, x: Tensor, fast: bool) -> Tensor:
        """z = W_z·y + x (Eq. 6), with BN after W_z when ``norm="batch"``."""
        # The attention layout leaves y channels-last in memory; give z the input's layout, so the
        # layers after the block run the same kernels as without it (a block at identity then
        # reproduces the network without it bit for bit).
        layout = memory_format(x)
        y = y.contiguous(memory_format=layout)
        bn = self.bn if self.norm == "batch" else None
        if fast:
            return fuse.conv_bn(self.out, bn, y, residual=x).contiguous(memory_format=layout)
        wz = self.out(y)
        # x first: the sum takes x's layout even where the convolution returned another one
        # (PyTorch's one-thread float32 convolution gives contiguous outputs)
        return x + (wz if bn is None else bn(wz))


def _to5d_kernel(kernel: tuple[int, ...] | None, dim: int) -> tuple[int, int, int]:
    """The pooling kernel as (kT, kH, kW), matching :func:`_to5d`."""
    t, h, w = (1,) * (3 - dim) + (kernel or (1,) * dim)
    return (t, h, w)


def find_nonlocal_blocks(model: nn.Module) -> dict[str, NonLocalBlock]:
    """Every :class:`NonLocalBlock` of ``model`` by qualified module name (e.g. ``res4.nonlocal5``):
    the names weight files, ``--block`` options and load reports use."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NonLocalBlock)}
