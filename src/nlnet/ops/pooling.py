"""Max-pooling in the input's own dtype, also under autocast.

CPU autocast lists ``max_pool3d`` among the float32 ops, so a bf16 activation would be copied to
float32 before pool1/pool2/the non-local sub-sampling and the float32 copy kept for the backward
(the largest activation of the network: conv1's output).  A max is exact in any dtype, so nlnet
pools in the dtype it receives: same values, no cast, half the saved memory under bf16.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from nlnet.ops.recompute import lean_max_pool

_AUTOCAST_DEVICES = ("cpu", "cuda")


def max_pool(pool: Callable[..., Tensor], x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """``pool(x, *args, **kwargs)`` (a max-pool module or function) with autocast off.

    In a lean training region (:mod:`nlnet.ops.recompute`) the pool keeps no argmax.
    """
    kind = x.device.type
    if kind in _AUTOCAST_DEVICES and torch.is_autocast_enabled(kind):
        with torch.autocast(kind, enabled=False):
            return lean_max_pool(pool, x, *args, **kwargs)
    return lean_max_pool(pool, x, *args, **kwargs)
