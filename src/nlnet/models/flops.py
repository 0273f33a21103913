"""Parameters and FLOPs per stage of the video models (§2.4 of the reference, Table 2e, §5.1).

Convolutions and the classifier are counted by :class:`torch.utils.flop_counter.FlopCounterMode`
(2 FLOPs per multiply-add) on the ``meta`` device, so no memory is used and no time is spent on
arithmetic.  The non-local attention core is counted analytically, in its explicit form
(θᵀφ then f·g: 2·B'·Nq·Nk·(d_k + d_v) FLOPs): ``FlopCounterMode`` counts 0 FLOPs for
``scaled_dot_product_attention`` on CPU in torch 2.14, and the exact fast paths for the
dot-product form do fewer operations than the paper's formulation that the costs describe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from nlnet.block import NonLocalBlock, find_nonlocal_blocks
from nlnet.geometry import attention_problems, key_shape
from nlnet.models.resnet import VideoResNet


def attention_flops(block: NonLocalBlock, x_shape: Sequence[int]) -> int:
    """FLOPs of the explicit non-local core of ``block`` for an input of ``x_shape`` (B, C, T, H, W).

    Affinity θᵀφ: B'·Nq·Nk·d_k multiply-adds; aggregation f·g: B'·Nq·Nk·d_v (Eq. 1–5).  For
    ``concatenation`` the affinity is ReLU(w_θ·θ_i + w_φ·φ_j), Nq·Nk additions, counted as
    B'·Nq·Nk multiply-adds.
    """
    b, c = int(x_shape[0]), int(x_shape[1])
    spatial = [int(s) for s in x_shape[2:]]
    query = (1,) * (3 - len(spatial)) + tuple(spatial)
    kernel = (1,) * (3 - block.dim) + tuple(block.subsample or (1,) * block.dim)
    groups, nq, nk = attention_problems(
        block.extent, block.temporal_groups, query, key_shape(query, kernel)
    )
    d_v = block.inner_channels
    if block.pairwise == "gaussian":
        d_k = c
    elif block.pairwise == "concatenation":
        d_k = 1
    else:
        d_k = block.inner_channels
    return 2 * b * groups * nq * nk * (d_k + d_v)


@dataclass
class CostRow:
    name: str
    params: int = 0
    flops: int = 0
    nl_params: int = 0
    nl_flops: int = 0


@dataclass
class CostReport:
    """Parameters and FLOPs per part of a model, for one input shape."""

    input_shape: tuple[int, ...]
    rows: list[CostRow] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self.rows)

    @property
    def nl_params(self) -> int:
        return sum(r.nl_params for r in self.rows)

    @property
    def nl_flops(self) -> int:
        return sum(r.nl_flops for r in self.rows)

    def table(self) -> str:
        head = f"{'part':<8}{'params (M)':>12}{'GFLOPs':>10}{'GMACs':>9}{'NL params (M)':>15}{'NL GFLOPs':>11}"
        lines = [f"input {tuple(self.input_shape)}", head, "-" * len(head)]
        for r in [
            *self.rows,
            CostRow("total", self.params, self.flops, self.nl_params, self.nl_flops),
        ]:
            lines.append(
                f"{r.name:<8}{r.params / 1e6:>12.3f}{r.flops / 1e9:>10.2f}{r.flops / 2e9:>9.2f}"
                f"{r.nl_params / 1e6:>15.3f}{r.nl_flops / 1e9:>11.2f}"
            )
        if self.flops:
            lines.append(
                f"NL share: {100 * self.nl_params / max(self.params, 1):.1f}% of parameters, "
                f"{100 * self.nl_flops / self.flops:.1f}% of FLOPs"
            )
        return "\n".join(lines)


def _part_of(name: str, parts: Sequence[str]) -> str | None:
    top = name.split(".", 1)[0]
    return top if top in parts else None


class _CostProbe(nn.Module):
    """Stands in for a NonLocalBlock while counting: runs its 1×1 convs (counted by
    FlopCounterMode) on the right shapes, records the input shape, and returns x.

    The attention core is then counted analytically, independently of the backend (the exact
    fast paths and SDPA are not what the paper's costs describe, and some do not run on meta).
    """

    def __init__(self, block: NonLocalBlock, shapes: dict[str, tuple[int, ...]], name: str) -> None:
        super().__init__()
        self.block, self.shapes, self.name = block, shapes, name

    def forward(self, x: Tensor) -> Tensor:
        b = self.block
        self.shapes[self.name] = tuple(x.shape)
        kv = b._pool(x) if b.pool_before_conv else x
        if b.pairwise != "gaussian":
            b.theta(x)
            b.phi(kv)
        y = b.g(kv)
        if not b.pool_before_conv:
            y = b._pool(y)
        b.out(torch.empty(x.shape[0], b.inner_channels, *x.shape[2:], device=x.device))
        return x


def count_cost(model: VideoResNet, input_shape: Sequence[int]) -> CostReport:
    """Parameters and forward FLOPs of ``model`` per stage for a clip of ``input_shape``.

    The model is copied to the ``meta`` device (nothing is computed); the NL attention core is
    counted with :func:`attention_flops`.
    """
    import copy

    meta = copy.deepcopy(model).to("meta").eval()
    parts = ["stem", *meta.stage_names, "head"]
    blocks = find_nonlocal_blocks(meta)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, block in blocks.items():
        parent, _, child = name.rpartition(".")
        setattr(meta.get_submodule(parent), child, _CostProbe(block, shapes, name))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(torch.empty(*input_shape, device="meta"))
    counts = {
        k.split(".", 1)[1] if "." in k else "": sum(v.values())
        for k, v in counter.get_flop_counts().items()
        if k.startswith(type(meta).__name__)
    }
    rows = {p: CostRow(p) for p in parts}
    for name, p in model.named_parameters():
        part = _part_of(name, parts)
        if part is None:
            raise RuntimeError(f"parameter {name} is outside {parts}")
        rows[part].params += p.numel()
        if ".nonlocal" in name:
            rows[part].nl_params += p.numel()
    for part in parts:
        rows[part].flops = counts.get(part, 0)
    for name, block in blocks.items():
        part = name.split(".", 1)[0]
        convs = counts.get(name, 0)  # the probe ran only the block's convolutions
        core = attention_flops(block, shapes[name])
        rows[part].flops += core
        rows[part].nl_flops += convs + core
    return CostReport(tuple(input_shape), [rows[p] for p in parts])


def paper_cost_table(frames: int = 32, size: int = 224) -> str:
    """Table 2e's relative costs and §5.1's "~70% parameters, ~80% FLOPs" statement, recomputed."""
    from nlnet.models import create_model

    shape = (1, 3, frames, size, size)

    def cost(name: str, **kw: Any) -> CostReport:
        return count_cost(create_model(name, device="meta", **kw), shape)

    base = cost("c2d_r101")
    rows = [
        ("C2D R101 (baseline)", base, "1×", "1×"),
        ("I3D_3×3×3 R101", cost("i3d_r101", inflate="3x3x3"), "1.5×", "1.8×"),
        ("I3D_3×1×1 R101", cost("i3d_r101"), "1.2×", "1.5×"),
        ("NL C2D R101, 5 blocks", cost("c2d_r101_nl5"), "1.2×", "1.2×"),
        ("NL C2D R50, 5 blocks", cost("c2d_r50_nl5"), "~0.7× (§5.1)", "~0.8× (§5.1)"),
    ]
    lines = [
        f"input 1×3×{frames}×{size}×{size}, 400 classes, variant 'original'",
        "| model | params (M) | GMACs | params vs C2D R101 | FLOPs vs C2D R101 | paper (params / FLOPs) |",
        "|---|---|---|---|---|---|",
    ]
    for label, r, p_paper, f_paper in rows:
        lines.append(
            f"| {label} | {r.params / 1e6:.2f} | {r.flops / 2e9:.1f} | {r.params / base.params:.2f}× "
            f"| {r.flops / base.flops:.2f}× | {p_paper} / {f_paper} |"
        )
    return "\n".join(lines)
