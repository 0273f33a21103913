""" "Precise BN" (original code, ``lib/utils/bn_helper.py``; paper §4.1 trains with BN on).

BatchNorm running statistics are exponential averages over recent iterations while the weights
were still moving; before an evaluation or checkpoint the original code recomputes them from
200 training mini-batches per GPU with the final weights: per channel, the mean of the batch
means E[x] and of E[x²] over the batches, and var = E[x²] − E[x]² (population variance).
Processes average their statistics (equal batch counts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from nlnet.engine import distributed as dist


def bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm layers that normalise with batch statistics in training (not frozen ones)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training
    ]


@torch.no_grad()
def update_bn_stats(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any],
    num_batches: int,
) -> int:
    """Recompute running mean/var of ``model``'s BN layers over ``num_batches`` batches.

    ``forward(model, batch)`` runs the model on a batch. Returns the number of batches used.
    The model must be in training mode (BN uses batch statistics, as during training).
    """
    layers = bn_modules(model)
    if not layers or num_batches <= 0:
        return 0
    sums: dict[nn.Module, list[torch.Tensor]] = {}

    def hook(m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().double()
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dim=dims)
        meansq = (x * x).mean(dim=dims)
        if m in sums:
            sums[m][0] += mean
            sums[m][1] += meansq
        else:
            sums[m] = [mean, meansq]

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    n = 0
    # Dropout and other random layers must not shift the training run's random stream.
    with torch.random.fork_rng(devices=[]):
        try:
            for batch in batches:
                if n >= num_batches:
                    break
                forward(model, batch)
                n += 1
        finally:
            for h in handles:
                h.remove()
    if n == 0:
        return 0
    for m in layers:
        mean, meansq = (t / n for t in sums[m])
        stats = dist.all_reduce_mean(torch.stack([mean, meansq]))
        var = (stats[1] - stats[0] ** 2).clamp_min(0)
        m.running_mean.copy_(stats[0].to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
    return n
