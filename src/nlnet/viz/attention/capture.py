"""Running a model on a clip and keeping one non-local block's attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nlnet.block import find_nonlocal_blocks
from nlnet.viz.attention.grid import AttentionGrid, dense_attention


@dataclass
class CapturedAttention:
    """One block's attention for one clip of a forward pass."""

    name: str
    weights: Tensor  # dense (Nq, Nk) for the chosen clip, float32 on CPU
    grid: AttentionGrid
    output: Any  # the model's output (e.g. logits)


def capture_attention(
    model: nn.Module,
    clip: Tensor,
    *,
    block: str | None = None,
    batch_index: int = 0,
) -> CapturedAttention:
    """Run ``model(clip)`` and return the attention of non-local block ``block``.

    ``clip`` is the network input (B, C, T, H, W); ``block`` a module name from
    :func:`nonlocal_blocks` (default: the first).  The block is called with
    ``return_attention=True`` for this one pass (exact weights, explicit backend) in eval mode;
    the model is left unchanged afterwards.
    """
    blocks = find_nonlocal_blocks(model)
    if not blocks:
        raise ValueError("the model has no NonLocalBlock: nothing to visualise")
    if block is None:
        block = next(iter(blocks))
    if block not in blocks:
        raise ValueError(f"unknown block {block!r}; the model's non-local blocks: {list(blocks)}")
    if clip.dim() != 5:
        raise ValueError(f"clip must be (B, C, T, H, W), got shape {tuple(clip.shape)}")
    target = blocks[block]
    seen: dict[str, Any] = {}
    original = target.forward

    def forward(x: Tensor, **kwargs: Any) -> Tensor:
        kwargs.pop("return_attention", None)
        z, w = original(x, return_attention=True, **kwargs)
        seen["weights"], seen["shape"] = w.detach(), tuple(x.shape[2:])
        return z

    was_training = model.training
    model.eval()  # inference statistics; restored below
    target.forward = forward  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            output = model(clip)
    finally:
        del target.forward  # back to the class's method
        model.train(was_training)
    if "weights" not in seen:
        raise RuntimeError(f"block {block!r} was not called by the model's forward pass")
    grid = AttentionGrid.for_block(target, seen["shape"], tuple(clip.shape[2:]))
    dense = dense_attention(
        seen["weights"].float().cpu(),
        grid,
        extent=target.extent,
        temporal_groups=target.temporal_groups,
        batch_index=batch_index,
    )
    return CapturedAttention(block, dense, grid, output)
