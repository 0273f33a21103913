"""Memory layout of activations (channels-last or contiguous)."""

from __future__ import annotations

import torch
from torch import Tensor


def memory_format(x: Tensor) -> torch.memory_format:
    """channels-last(-3d) when x is laid out so (and not also contiguous), else contiguous."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
        return fmt
    return torch.contiguous_format
