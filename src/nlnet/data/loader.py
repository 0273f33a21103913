"""Reproducible loading with DataLoader workers and DistributedSampler (§4.1 training runs).

Two ways to make a run reproducible from its seed:

* :class:`SeededSampler` wraps any sampler (``RandomSampler``, ``DistributedSampler`` …) and
  yields ``(index, seed)`` keys; the dataset then takes every random draw of that item from a
  generator seeded with ``seed`` (``dataset[(i, seed)]``).  The clips depend only on the run's
  seed, the epoch and the position in the epoch — not on the number of workers or on which
  worker reads an item — so a resumed run sees the same clips.
* Plain indices use torch's global RNG, which PyTorch seeds in each worker from the DataLoader's
  ``generator``; :func:`seed_worker` (``worker_init_fn``) seeds Python's and NumPy's RNGs from it
  too.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from nlnet.seeds import derive_seed


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed ``random`` and NumPy from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class SeededSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, derive_seed(seed, rank, epoch, position))`` for the indices of ``sampler``.

    ``set_epoch`` is forwarded to the wrapped sampler (``DistributedSampler`` needs it).  Under
    DDP, give each rank a different ``seed`` offset only if you want different augmentations
    for the same index; positions already differ between ranks' shards.
    """

    def __init__(self, sampler: Iterable[int], seed: int, rank: int = 0) -> None:
        self.sampler = sampler
        self.seed = int(seed)
        self.rank = int(rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.sampler):
            yield int(index), derive_seed(self.seed, self.rank, self.epoch, position)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]
