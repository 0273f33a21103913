"""Reproducible data order: which sample, with which random seed, every process reads.

A training sample is addressed by its *global position* in the run: iteration ``it`` and offset
``k`` inside that iteration's global batch (all processes, all accumulation steps). The data set
index comes from a per-epoch permutation seeded by (run seed, epoch) and the augmentation seed is
derived from (run seed, iteration, offset); the data set draws with ``dataset[(index, seed)]``.
Data order and augmentation therefore depend on neither the number of DataLoader workers nor
when the run was interrupted, and a 2-process run reads exactly the samples a 1-process run with
the same global batch reads.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from nlnet.seeds import derive_seed

__all__ = ["ShardSampler", "TrainBatchSampler", "derive_seed"]


class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    """Infinite stream of micro-batches of ``(index, seed)`` for one process.

    Global batch per iteration = ``batch_size × world_size × accumulation``; micro-batch ``a`` of
    iteration ``it`` on rank ``r`` holds offsets ``a·W·B + r·B + j`` (j < B).
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        *,
        seed: int,
        start_iter: int = 0,
        rank: int = 0,
        world_size: int = 1,
        accumulation: int = 1,
        stream: int = 0,
    ) -> None:
        if dataset_size <= 0:
            raise ValueError("the training data set is empty")
        self.n = dataset_size
        self.b = batch_size
        self.seed = seed
        self.start_iter = start_iter
        self.rank = rank
        self.world = world_size
        self.accum = accumulation
        self.stream = stream
        self._perm: tuple[int, torch.Tensor] | None = None

    @property
    def global_batch(self) -> int:
        return self.b * self.world * self.accum

    def _index(self, position: int) -> int:
        epoch, within = divmod(position, self.n)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.stream, epoch, 1))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return int(self._perm[1][within])

    def batch(self, iteration: int, micro: int) -> list[tuple[int, int]]:
        """The (index, seed) pairs this rank reads for micro-batch ``micro`` of ``iteration``."""
        out = []
        for j in range(self.b):
            offset = micro * self.world * self.b + self.rank * self.b + j
            position = iteration * self.global_batch + offset
            seed = derive_seed(self.seed, self.stream, iteration, offset, 2)
            out.append((self._index(position), seed))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        it = self.start_iter
        while True:
            for a in range(self.accum):
                yield self.batch(it, a)
            it += 1

    def __len__(self) -> int:  # pragma: no cover - infinite; DataLoader only needs it for len()
        raise TypeError("TrainBatchSampler is infinite")


class ShardSampler(Sampler[int]):
    """Evaluation sharding without padding: rank r reads items r, r+W, r+2W, … exactly once.

    Unlike ``DistributedSampler`` nothing is repeated to even out the shards, so gathering the
    ranks' results covers every view of every video exactly once (no de-duplication needed).
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.rank, self.world = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))
