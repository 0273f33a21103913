"""§4 / Table 1: a generic video ResNet (C2D, I3D) with non-local blocks, from small modules.

One class, :class:`VideoResNet`, covers C2D, I3D-3×1×1 and I3D-3×3×3 (and small demo networks):
each residual block receives its temporal kernel size, and ``inflate`` says which of its
convolutions carries it.  Non-local blocks are inserted *after* the residual blocks named in a
``{stage: [block indices]}`` mapping, like the original code (§5.3 of the reference).

Parameter names (the checkpoint contract; the converters map every other layout onto these):

==============================================  =============================================
name                                            what it is
==============================================  =============================================
``stem.conv``, ``stem.bn``                      conv1 (kT×7×7, no bias) and its BN
``res{s}.{i}.conv_a`` / ``bn_a``                bottleneck 1×1 (kT×1×1 when inflate="3x1x1")
``res{s}.{i}.conv_b`` / ``bn_b``                bottleneck 3×3, carries the spatial stride
                                                (kT×3×3 when inflate="3x3x3")
``res{s}.{i}.conv_c`` / ``bn_c``                bottleneck 1×1 expansion (×4)
``res{s}.{i}.shortcut_conv`` / ``shortcut_bn``  projection shortcut (first block of a stage)
``res{s}.nonlocal{i}.*``                        NonLocalBlock after residual block ``i``
                                                (names of :mod:`nlnet.block`)
``head.fc``                                     the classifier (global avg pool → dropout → fc)
==============================================  =============================================

Stages are numbered like the paper: ``res2`` is the first (after the stem), ``res5`` the last of a
ResNet-50.  A basic (two 3×3) block uses ``conv_a``/``bn_a`` and ``conv_b``/``bn_b`` only.
With ``freeze_bn=True`` every backbone BN is a :class:`FrozenBatchNorm` whose state is
``weight``/``bias`` (the folded scale and shift, like the original code's "affine" models).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nlnet import fuse
from nlnet.block import NonLocalBlock, find_nonlocal_blocks
from nlnet.models.conv import Conv3d
from nlnet.ops.fast import is_tracing
from nlnet.ops.pooling import max_pool
from nlnet.ops.recompute import batch_norm_relu, lean_region

Triple = tuple[int, int, int]
PoolSpec = tuple[Triple, Triple, Triple]  # (kernel, stride, padding)

INFLATE_STYLES: tuple[str, ...] = ("3x1x1", "3x3x3")
BLOCK_TYPES: tuple[str, ...] = ("bottleneck", "basic")


def _triple(value: int | Sequence[int], name: str) -> Triple:
    if isinstance(value, int):
        return (value, value, value)
    t = tuple(value)
    if len(t) != 3 or not all(isinstance(v, int) and v >= 0 for v in t):
        raise ValueError(f"{name} must be an int or 3 non-negative ints (T, H, W), got {value!r}")
    return (t[0], t[1], t[2])


class FrozenBatchNorm(nn.Module):
    """A BN folded into a fixed per-channel affine y = x·weight + bias (the original AffineNd).

    Used by the 128-frame recipe (§4.1, "all BN frozen"): neither the statistics nor the scale and
    shift are trained.  ``weight``/``bias`` are buffers; a BatchNorm state dict loaded through
    :func:`nlnet.models.load_weights` is folded: weight = γ/√(var+eps), bias = β − mean·weight.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features, device=device, dtype=dtype))
        self.register_buffer("bias", torch.zeros(num_features, device=device, dtype=dtype))

    @classmethod
    def from_batch_norm(cls, bn: nn.modules.batchnorm._BatchNorm) -> FrozenBatchNorm:
        """Fold a trained BN (its running statistics and γ/β) into a frozen affine."""
        out = cls(bn.num_features, bn.eps, device=bn.running_mean.device)
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var.float() + bn.eps)
            if bn.affine:
                scale = scale * bn.weight.float()
            shift = -bn.running_mean.float() * scale
            if bn.affine:
                shift = shift + bn.bias.float()
            out.weight.copy_(scale)
            out.bias.copy_(shift)
        return out.to(bn.running_mean.dtype)

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape).to(x.dtype) + self.bias.view(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class _NormFactory:
    """Builds the backbone's norm layers: BatchNorm3d, or FrozenBatchNorm under ``freeze_bn``."""

    def __init__(self, freeze: bool, eps: float, momentum: float, factory: dict[str, Any]) -> None:
        self.freeze, self.eps, self.momentum, self.factory = freeze, eps, momentum, factory

    def __call__(self, channels: int) -> nn.Module:
        if self.freeze:
            return FrozenBatchNorm(channels, self.eps, **self.factory)
        return nn.BatchNorm3d(channels, eps=self.eps, momentum=self.momentum, **self.factory)


class Stem(nn.Module):
    """conv1 → BN → ReLU → pool1 (Table 1's first two rows)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Triple,
        stride: Triple,
        padding: Triple,
        pool: PoolSpec | None,
        norm: _NormFactory,
        factory: dict[str, Any],
    ) -> None:
        super().__init__()
        self.conv = Conv3d(
            in_channels, out_channels, kernel, stride, padding, bias=False, **factory
        )
        self.bn = norm(out_channels)
        self.pool = None if pool is None else nn.MaxPool3d(pool[0], pool[1], pool[2])

    def forward(self, x: Tensor) -> Tensor:
        x = batch_norm_relu(self.bn, self.conv(x))
        return x if self.pool is None else _checked_pool(self.pool, x, "pool1")

    def fast_forward(self, x: Tensor) -> Tensor:
        """Inference: conv1 with BN folded and ReLU fused (:mod:`nlnet.fuse`)."""
        x = fuse.conv_bn(self.conv, self.bn, x, relu=True)
        return x if self.pool is None else _checked_pool(self.pool, x, "pool1")


class _Residual(nn.Module):
    """Shared shortcut logic: projection (1×1×1 conv with the block's stride + BN) when needed."""

    shortcut_conv: nn.Conv3d | None
    shortcut_bn: nn.Module | None

    def _make_shortcut(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        norm: _NormFactory,
        factory: dict[str, Any],
    ) -> None:
        if in_channels != out_channels or stride != 1:
            self.shortcut_conv = Conv3d(
                in_channels, out_channels, 1, (1, stride, stride), bias=False, **factory
            )
            self.shortcut_bn = norm(out_channels)
        else:
            self.shortcut_conv = None
            self.shortcut_bn = None

    def _shortcut(self, x: Tensor) -> Tensor:
        if self.shortcut_conv is None:
            return x
        assert self.shortcut_bn is not None
        return self.shortcut_bn(self.shortcut_conv(x))

    def _fast_shortcut(self, x: Tensor) -> Tensor:
        if self.shortcut_conv is None:
            return x
        return fuse.conv_bn(self.shortcut_conv, self.shortcut_bn, x)


class Bottleneck(_Residual):
    """ResNet v1 bottleneck, stride on the 3×3 (reference §5.4): 1×1 → 3×3 → 1×1, ×4 expansion.

    ``temporal_kernel`` > 1 inflates ``conv_a`` (I3D-3×1×1) or ``conv_b`` (I3D-3×3×3), with
    temporal padding ``temporal_kernel // 2`` so time is preserved.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        width: int,
        *,
        stride: int = 1,
        temporal_kernel: int = 1,
        inflate: str = "3x1x1",
        norm: _NormFactory,
        factory: dict[str, Any],
    ) -> None:
        super().__init__()
        out_channels = width * self.expansion
        kt = temporal_kernel
        a_t, b_t = (kt, 1) if inflate == "3x1x1" else (1, kt)
        self.conv_a = Conv3d(
            in_channels, width, (a_t, 1, 1), padding=(a_t // 2, 0, 0), bias=False, **factory
        )
        self.bn_a = norm(width)
        self.conv_b = Conv3d(
            width,
            width,
            (b_t, 3, 3),
            stride=(1, stride, stride),
            padding=(b_t // 2, 1, 1),
            bias=False,
            **factory,
        )
        self.bn_b = norm(width)
        self.conv_c = Conv3d(width, out_channels, 1, bias=False, **factory)
        self.bn_c = norm(out_channels)
        self._make_shortcut(in_channels, out_channels, stride, norm, factory)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = batch_norm_relu(self.bn_a, self.conv_a(x))
        y = batch_norm_relu(self.bn_b, self.conv_b(y))
        y = self.bn_c(self.conv_c(y))
        return F.relu(y + self._shortcut(x))

    def fast_forward(self, x: Tensor) -> Tensor:
        """Inference: the same block as three folded convolutions, the add + ReLU fused."""
        y = fuse.conv_bn(self.conv_a, self.bn_a, x, relu=True)
        y = fuse.conv_bn(self.conv_b, self.bn_b, y, relu=True)
        shortcut = self._fast_shortcut(x)
        return fuse.conv_bn(self.conv_c, self.bn_c, y, relu=True, residual=shortcut)


class BasicBlock(_Residual):
    """Two 3×3 convolutions (ResNet-18/34 style); ``temporal_kernel`` inflates ``conv_a``."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        width: int,
        *,
        stride: int = 1,
        temporal_kernel: int = 1,
        inflate: str = "3x1x1",
        norm: _NormFactory,
        factory: dict[str, Any],
    ) -> None:
        super().__init__()
        del inflate  # a basic block has one place for the temporal kernel
        kt = temporal_kernel
        self.conv_a = Conv3d(
            in_channels,
            width,
            (kt, 3, 3),
            stride=(1, stride, stride),
            padding=(kt // 2, 1, 1),
            bias=False,
            **factory,
        )
        self.bn_a = norm(width)
        self.conv_b = Conv3d(width, width, (1, 3, 3), padding=(0, 1, 1), bias=False, **factory)
        self.bn_b = norm(width)
        self._make_shortcut(in_channels, width, stride, norm, factory)
        self.out_channels = width

    def forward(self, x: Tensor) -> Tensor:
        y = batch_norm_relu(self.bn_a, self.conv_a(x))
        y = self.bn_b(self.conv_b(y))
        return F.relu(y + self._shortcut(x))

    def fast_forward(self, x: Tensor) -> Tensor:
        """Inference: two folded convolutions, the add + ReLU fused."""
        y = fuse.conv_bn(self.conv_a, self.bn_a, x, relu=True)
        shortcut = self._fast_shortcut(x)
        return fuse.conv_bn(self.conv_b, self.bn_b, y, relu=True, residual=shortcut)


class ResStage(nn.Sequential):
    """One stage: residual blocks ``0..n-1``, with ``nonlocal{i}`` right after block ``i``."""

    def fast_forward(self, x: Tensor) -> Tensor:
        for layer in self:
            fast = getattr(layer, "fast_forward", None)
            x = fast(x) if fast is not None else layer(x)
        return x


TEST_HEADS: tuple[str, ...] = ("global", "fully_conv")


class Head(nn.Module):
    """Average pool → dropout → fc (§4.1; reference §5.4).

    Training (and ``test_head="global"`` in eval mode): global average pool over T×H×W → dropout
    → fc, (B, num_classes) logits for any T×H×W.

    ``test_head="fully_conv"`` in eval mode is the original release's test net (reference §4.2,
    §5.4, ``TEST_FULLY_CONV``): res5 is averaged with a [T, 7, 7] window at stride 1, the fc is
    applied at every window position as a 1×1×1 convolution, each position is softmaxed and the
    probabilities are averaged over positions (a 256×256 crop gives res5 8×8, i.e. 2×2 positions).
    The window is clipped to res5's size, so a res5 of at most 7×7 gives one position, i.e.
    ``softmax`` of the global head.  It returns the **log** of the averaged probabilities,
    ``log(mean_p softmax(fc(x_p)))``: every caller that turns logits into probabilities with a
    softmax (``nlnet eval``, ``nlnet predict``, ``argmax``/top-k) gets exactly the averaged
    probabilities, since ``softmax(log p) = p`` when ``p`` sums to 1.  (It is meant for softmax
    classifiers; a sigmoid of it is not a per-class probability.)  :attr:`returns_log_probabilities`
    says when the output is such log-probabilities.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        dropout: float,
        factory: dict[str, Any],
        test_head: str = "global",
        window: int = 7,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes, **factory)
        self.window = window
        self.test_head = test_head

    @property
    def test_head(self) -> str:
        """``"global"`` or ``"fully_conv"``: the head used in eval mode."""
        return self._test_head

    @test_head.setter
    def test_head(self, value: str) -> None:
        if value not in TEST_HEADS:
            raise ValueError(f"unknown test_head {value!r}; expected one of {TEST_HEADS}")
        self._test_head = value

    @property
    def returns_log_probabilities(self) -> bool:
        """True when :meth:`forward` returns log-probabilities (fully-conv head in eval mode)."""
        return self._test_head == "fully_conv" and not self.training

    def forward(self, x: Tensor) -> Tensor:
        if self.returns_log_probabilities:
            return self.fully_conv(x).log()
        x = x.mean(dim=(2, 3, 4))
        return self.fc(self.dropout(x))

    def fully_conv(self, x: Tensor) -> Tensor:
        """Averaged probabilities (B, num_classes) of the fully-convolutional test head."""
        if x.dim() != 5:
            raise ValueError(f"the head expects (B, C, T, H, W) features, got {tuple(x.shape)}")
        t, h, w = x.shape[2:]
        pooled = F.avg_pool3d(x, (t, min(self.window, h), min(self.window, w)), stride=1)
        # (B, C, 1, H', W') → (B, P, C): the fc at every position is a 1×1×1 convolution.
        positions = pooled.flatten(2).transpose(1, 2)
        logits = F.linear(positions, self.fc.weight, self.fc.bias)
        # at least float32 under autocast (half-precision logits), float64 stays float64
        dtype = torch.promote_types(logits.dtype, torch.float32)
        return torch.softmax(logits, dim=-1, dtype=dtype).mean(dim=1)

    def extra_repr(self) -> str:
        return f"test_head={self._test_head!r}, window={self.window}"


def stage_name(stage: int | str) -> str:
    """``3`` or ``"res3"`` → ``"res3"`` (stages are numbered like the paper: res2 is the first)."""
    if isinstance(stage, int) and not isinstance(stage, bool):
        return f"res{stage}"
    if isinstance(stage, str) and stage.startswith("res") and stage[3:].isdigit():
        return stage
    raise ValueError(f"a stage is an int (2 for res2) or a name like 'res3', got {stage!r}")


class VideoResNet(nn.Module):
    """A C2D / I3D ResNet for (B, C, T, H, W) clips (§4, Table 1), with non-local blocks.

    Args:
        stage_blocks: residual blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
        stage_widths: inner width of each stage (64, 128, 256, 512); a bottleneck outputs 4×.
        temporal_kernels: per stage, per block, the temporal kernel size (1 = a 2D kernel,
            3 = inflated).  All ones is C2D; the I3D pattern of the original code is
            ``[[3,3,3], [3,1,3,1], [3,1,3,1,3,1], [1,3,1]]`` (§2.2 of the reference).
        inflate: which conv of a bottleneck carries the temporal kernel: ``"3x1x1"`` (the first
            1×1, the original code's I3D) or ``"3x3x3"`` (the 3×3; Table 2e).
        block: ``"bottleneck"`` (ResNet-50/101) or ``"basic"`` (two 3×3 convs).
        stage_strides: spatial stride of the first block of each stage (default 1, 2, 2, …).
        in_channels: input channels (3 for RGB).
        stem_channels, stem_kernel, stem_stride, stem_padding: conv1 (default padding k // 2).
        pool1: max-pool after the stem as ((kT,kH,kW), stride, padding), or ``None``.
        pool2: max-pool after the first stage (Table 1's 3×1×1 / the code's 2×1×1), or ``None``.
        nonlocal_blocks: ``{stage: [block indices]}``: a NonLocalBlock right after each listed
            residual block (stage 3 or "res3"; indices 0-based).
        nonlocal_kwargs: keyword arguments of :class:`nlnet.block.NonLocalBlock` for every block
            (pairwise, extent, norm, temporal_groups, scale, pool_before_conv, backend, …).
        nonlocal_stage_kwargs: per-stage overrides of ``nonlocal_kwargs``, e.g.
            ``{3: {"temporal_groups": 4}}`` (the original 128-frame models' res3).
        num_classes, dropout: the head (dropout 0.5 in the paper).
        freeze_bn: every backbone BN becomes a :class:`FrozenBatchNorm` (the 128-frame recipe).
        bn_eps, bn_momentum: backbone BN settings (the original code: 1e-5 and Caffe2's 0.9 =
            PyTorch's 0.1).
        zero_init_residual: start the last BN of each residual branch at γ = 0.
        fc_init_std: std of the classifier's Gaussian init (0.01 in the original code).
        test_head: the head in eval mode: ``"global"`` (global mean → fc, logits) or
            ``"fully_conv"`` (the original release's test net, §4.2: fc at every position of a
            [T, 7, 7] window, softmax per position, averaged; returns log-probabilities). See
            :class:`Head`; changeable after construction through :attr:`test_head`.
    """

    def __init__(
        self,
        *,
        stage_blocks: Sequence[int],
        stage_widths: Sequence[int],
        temporal_kernels: Sequence[Sequence[int]] | None = None,
        inflate: str = "3x1x1",
        block: str = "bottleneck",
        stage_strides: Sequence[int] | None = None,
        in_channels: int = 3,
        stem_channels: int = 64,
        stem_kernel: int | Sequence[int] = (1, 7, 7),
        stem_stride: int | Sequence[int] = (2, 2, 2),
        stem_padding: int | Sequence[int] | None = None,
        pool1: PoolSpec | None = ((2, 3, 3), (2, 2, 2), (0, 0, 0)),
        pool2: PoolSpec | None = ((2, 1, 1), (2, 1, 1), (0, 0, 0)),
        nonlocal_blocks: Mapping[int | str, Sequence[int]] | None = None,
        nonlocal_kwargs: Mapping[str, Any] | None = None,
        nonlocal_stage_kwargs: Mapping[int | str, Mapping[str, Any]] | None = None,
        num_classes: int = 400,
        dropout: float = 0.5,
        freeze_bn: bool = False,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        zero_init_residual: bool = False,
        fc_init_std: float = 0.01,
        test_head: str = "global",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        temporal_kernels, strides = _check_stages(
            stage_blocks, stage_widths, temporal_kernels, stage_strides, inflate, block, num_classes
        )
        self.stage_names = [f"res{i + 2}" for i in range(len(stage_blocks))]
        placement, overrides = self._nonlocal_plan(
            nonlocal_blocks or {}, nonlocal_stage_kwargs or {}, stage_blocks
        )
        self.inflate = inflate
        self.freeze_bn = freeze_bn
        self.fc_init_std = fc_init_std
        self.zero_init_residual = zero_init_residual
        norm = _NormFactory(freeze_bn, bn_eps, bn_momentum, factory)
        self.stem = self._build_stem(
            in_channels, stem_channels, stem_kernel, stem_stride, stem_padding, pool1, norm
        )

        def make_nonlocal(stage: str, channels: int) -> NonLocalBlock:
            kw = {**dict(nonlocal_kwargs or {}), **overrides.get(stage, {})}
            return NonLocalBlock(channels, dim=3, **kw, **factory)

        block_cls = Bottleneck if block == "bottleneck" else BasicBlock
        self.out_channels = self._build_stages(
            stem_channels,
            zip(stage_blocks, stage_widths, strides, temporal_kernels),
            partial(block_cls, inflate=inflate, norm=norm, factory=factory),
            placement,
            make_nonlocal,
            pool2,
        )
        self.head = Head(self.out_channels, num_classes, dropout, factory, test_head=test_head)
        self.reset_parameters()

    def _nonlocal_plan(
        self,
        mapping: Mapping[int | str, Sequence[int]],
        stage_kwargs: Mapping[int | str, Mapping[str, Any]],
        stage_blocks: Sequence[int],
    ) -> tuple[dict[str, tuple[int, ...]], dict[str, dict[str, Any]]]:
        """Where NL blocks go, ``{stage name: block indices}``, and the per-stage NL kwargs."""
        names, placement = self.stage_names, {}
        if not isinstance(mapping, Mapping):
            raise TypeError(
                f"nonlocal_blocks must be a mapping {{stage: [block indices]}}, got {mapping!r}"
            )
        for key, indices in mapping.items():
            name = stage_name(key)
            if name not in names:
                raise ValueError(f"nonlocal_blocks names stage {key!r}; stages are {names}")
            n = stage_blocks[names.index(name)]
            idx = tuple(sorted(set(indices)))
            if any(not isinstance(i, int) or not 0 <= i < n for i in idx):
                raise ValueError(
                    f"nonlocal_blocks[{key!r}] = {list(indices)}: block indices must be in [0, {n})"
                )
            placement[name] = idx
        overrides = {stage_name(k): dict(v) for k, v in stage_kwargs.items()}
        for name in overrides:
            if name not in names:
                raise ValueError(f"nonlocal_stage_kwargs names stage {name!r}; stages are {names}")
        return placement, overrides

    @staticmethod
    def _build_stem(
        in_channels: int,
        channels: int,
        kernel: int | Sequence[int],
        stride: int | Sequence[int],
        padding: int | Sequence[int] | None,
        pool1: PoolSpec | None,
        norm: _NormFactory,
    ) -> Stem:
        """conv1 → BN → ReLU → pool1 (Table 1's first rows); conv1's padding defaults to k // 2."""
        k = _triple(kernel, "stem_kernel")
        pad = _triple([x // 2 for x in k] if padding is None else padding, "stem_padding")
        stride3, pool = _triple(stride, "stem_stride"), _pool_spec(pool1, "pool1")
        return Stem(in_channels, channels, k, stride3, pad, pool, norm, norm.factory)

    def _build_stages(
        self,
        channels: int,
        stages: Iterable[tuple[int, int, int, Sequence[int]]],
        make_block: Callable[..., Bottleneck | BasicBlock],
        placement: Mapping[str, tuple[int, ...]],
        make_nonlocal: Callable[[str, int], NonLocalBlock],
        pool2: PoolSpec | None,
    ) -> int:
        """res2, res3, … (Table 1): residual blocks, an NL block after each placed one; out width."""
        for s, (name, (n, width, stride, kernels)) in enumerate(zip(self.stage_names, stages)):
            layers: OrderedDict[str, nn.Module] = OrderedDict()
            for i in range(n):
                unit = make_block(
                    channels, width, stride=1 if i else stride, temporal_kernel=kernels[i]
                )
                layers[str(i)] = unit
                channels = unit.out_channels
                if i in placement.get(name, ()):
                    layers[f"nonlocal{i}"] = make_nonlocal(name, channels)
            self.add_module(name, ResStage(layers))
            if s == 0:
                self.pool2 = self._build_pool2(pool2)
        return channels

    @staticmethod
    def _build_pool2(pool2: PoolSpec | None) -> nn.MaxPool3d | None:
        """The temporal max-pool after res2 (Table 1's 3×1×1; the original code's 2×1×1)."""
        spec = _pool_spec(pool2, "pool2")
        return None if spec is None else nn.MaxPool3d(spec[0], spec[1], spec[2])

    def reset_parameters(self) -> None:
        """MSRA init for convs, γ=1/β=0 for BN, N(0, 0.01) for the fc; NL blocks keep their own."""
        in_nonlocal = {id(m) for b in find_nonlocal_blocks(self).values() for m in b.modules()}
        for m in self.modules():
            if id(m) in in_nonlocal:
                continue  # the NL blocks have their own init (identity at start)
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                m.reset_parameters()
        if self.zero_init_residual:
            for m in self.modules():
                last = getattr(m, "bn_c", None) or (
                    getattr(m, "bn_b", None) if isinstance(m, BasicBlock) else None
                )
                if isinstance(last, nn.BatchNorm3d):
                    nn.init.zeros_(last.weight)
                elif isinstance(last, FrozenBatchNorm):
                    last.weight.zero_()
        nn.init.normal_(self.head.fc.weight, std=self.fc_init_std)
        nn.init.zeros_(self.head.fc.bias)

    @property
    def test_head(self) -> str:
        """The eval-mode head, ``"global"`` or ``"fully_conv"`` (see :class:`Head`)."""
        return self.head.test_head

    @test_head.setter
    def test_head(self, value: str) -> None:
        self.head.test_head = value

    def train(self, mode: bool = True) -> VideoResNet:
        """``nn.Module.train``; entering training also frees the fast path's folded weights."""
        if mode:
            fuse.clear_cache(self)  # they would be stale after the first step anyway
        return super().train(mode)

    @property
    def fast_inference(self) -> bool:
        """Eval forward with autograd off through :mod:`nlnet.fuse` (BN folded, channels-last).

        On by default; setting it also sets every NL block's flag.
        """
        return self.__dict__.get("_fast_inference", True)

    @fast_inference.setter
    def fast_inference(self, value: bool) -> None:
        self.__dict__["_fast_inference"] = bool(value)
        for block in find_nonlocal_blocks(self).values():
            block.fast_inference = bool(value)

    @property
    def lean_training(self) -> bool:
        """Training forward that keeps less for the backward (:mod:`nlnet.ops.recompute`).

        On by default: BN+ReLU outputs of 1 MiB or more are recomputed from the BN input and
        max-pools keep no argmax.  Same values and gradients; ``False`` gives the plain
        autograd graph (needed for a double backward).
        """
        return self.__dict__.get("_lean_training", True)

    @lean_training.setter
    def lean_training(self, value: bool) -> None:
        self.__dict__["_lean_training"] = bool(value)

    def stages(self) -> list[ResStage]:
        return [getattr(self, n) for n in self.stage_names]

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Every stage's output by name (``stem``, ``res2``, ``pool2``, ``res3``, …)."""
        if x.dim() != 5:
            raise ValueError(
                f"VideoResNet expects (B, C, T, H, W) clips, got shape {tuple(x.shape)}"
            )
        feats: dict[str, Tensor] = {}
        x = feats["stem"] = self.stem(x)
        for i, name in enumerate(self.stage_names):
            x = feats[name] = getattr(self, name)(x)
            if i == 0 and self.pool2 is not None:
                x = feats["pool2"] = _checked_pool(self.pool2, x, "pool2")
        return feats

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes) for a clip (B, C, T, H, W) of any size.

        With ``test_head="fully_conv"`` in eval mode: log-probabilities (see :class:`Head`).
        """
        if x.dim() != 5:
            raise ValueError(
                f"VideoResNet expects (B, C, T, H, W) clips, got shape {tuple(x.shape)}"
            )
        fast = fuse.enabled(self, x)  # eval, autograd off: BN folded, channels-last (nlnet.fuse)
        lean = self.lean_training and self.training and torch.is_grad_enabled()
        with lean_region(lean and not is_tracing()):
            x = self.stem.fast_forward(x) if fast else self.stem(x)
            for i, name in enumerate(self.stage_names):
                stage = getattr(self, name)
                x = stage.fast_forward(x) if fast else stage(x)
                if i == 0 and self.pool2 is not None:
                    x = _checked_pool(self.pool2, x, "pool2")
            return self.head(x)


def _checked_pool(pool: nn.MaxPool3d, x: Tensor, name: str) -> Tensor:
    """Max-pool, with a clear error when the clip is too short or small for this layout."""
    kernel = _triple(pool.kernel_size, name)
    padding = _triple(pool.padding, name)
    if any(s + 2 * p < k for s, k, p in zip(x.shape[2:], kernel, padding)):
        raise ValueError(
            f"the clip is too small for {name} (kernel {kernel}, padding {padding}): its input "
            f"is T×H×W = {tuple(x.shape[2:])}; use more frames / a larger crop, or another "
            f"variant (e.g. 'speed' has no temporal stride in the stem)"
        )
    return max_pool(pool, x)


def _check_stages(
    stage_blocks: Sequence[int],
    stage_widths: Sequence[int],
    temporal_kernels: Sequence[Sequence[int]] | None,
    stage_strides: Sequence[int] | None,
    inflate: str,
    block: str,
    num_classes: int,
) -> tuple[Sequence[Sequence[int]], list[int]]:
    """VideoResNet's layout arguments, checked; its temporal kernels and stage strides."""
    n_stages = len(stage_blocks)
    if n_stages == 0 or len(stage_widths) != n_stages:
        raise ValueError(
            f"stage_blocks and stage_widths must be non-empty and of equal length, got "
            f"{list(stage_blocks)} and {list(stage_widths)}"
        )
    if any(not isinstance(n, int) or n < 1 for n in stage_blocks):
        raise ValueError(f"stage_blocks must be positive ints, got {list(stage_blocks)}")
    if inflate not in INFLATE_STYLES:
        raise ValueError(f"unknown inflate {inflate!r}; expected one of {INFLATE_STYLES}")
    if block not in BLOCK_TYPES:
        raise ValueError(f"unknown block {block!r}; expected one of {BLOCK_TYPES}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    kernels = [[1] * n for n in stage_blocks] if temporal_kernels is None else temporal_kernels
    if len(kernels) != n_stages or any(len(k) != n for k, n in zip(kernels, stage_blocks)):
        raise ValueError(
            f"temporal_kernels must give one kernel per block {list(stage_blocks)}, "
            f"got {[list(k) for k in kernels]}"
        )
    if any(not isinstance(k, int) or k < 1 or k % 2 == 0 for s in kernels for k in s):
        raise ValueError(
            f"temporal kernels must be odd positive ints, got {[list(k) for k in kernels]}"
        )
    strides = list(stage_strides) if stage_strides is not None else [1] + [2] * (n_stages - 1)
    if len(strides) != n_stages:
        raise ValueError(f"stage_strides needs {n_stages} entries, got {strides}")
    return kernels, strides


def _pool_spec(spec: PoolSpec | None, name: str) -> PoolSpec | None:
    if spec is None:
        return None
    if len(spec) != 3:
        raise ValueError(f"{name} must be (kernel, stride, padding) or None, got {spec!r}")
    return (
        _triple(spec[0], f"{name} kernel"),
        _triple(spec[1], f"{name} stride"),
        _triple(spec[2], f"{name} padding"),
    )


def freeze_batch_norm(model: nn.Module, *, include_nonlocal: bool = False) -> nn.Module:
    """Replace every backbone BatchNorm by its folded :class:`FrozenBatchNorm`, in place.

    The original code's conversion to "affine" models before 128-frame fine-tuning (§4.1,
    reference §5.4).  NL blocks' BN are kept (trainable) unless ``include_nonlocal``: a frozen
    NL BN whose γ is still 0 would keep every gradient of the block at exactly zero.

    This is nlnet's one frozen-BN mechanism: the builders' ``freeze_bn=True`` creates the same
    :class:`FrozenBatchNorm` layers directly, :func:`nlnet.models.load_weights` folds BN
    statistics into them, and the engine's ``model.freeze_bn`` calls this function for models
    whose builder does not freeze by itself. A FrozenBatchNorm has no parameters and no
    train/eval behaviour, so nothing needs re-freezing after ``model.train()``.
    """
    skip = (
        set()
        if include_nonlocal
        else {id(m) for b in find_nonlocal_blocks(model).values() for m in b.modules()}
    )
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and id(child) not in skip:
                setattr(module, child_name, FrozenBatchNorm.from_batch_norm(child))
    if isinstance(model, VideoResNet):
        model.freeze_bn = True
    settings = getattr(model, "settings", None)
    if isinstance(settings, dict):
        settings["freeze_bn"] = True
    return model
