"""What the training engine needs from a task (video classification, COCO detection).

The engine (optimiser, schedule, AMP, DDP, checkpoints, resume, progress, logging) is shared; a
task supplies the model, the data and what a training step and an evaluation mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from nlnet.registry import Registry


class Task(Protocol):
    """Interface between the engine and a kind of problem."""

    def build_model(self) -> nn.Module:
        """The network, on CPU, freshly initialised (pretrained weights applied if configured)."""
        ...

    def build_dataset(self, split: str) -> Dataset:
        """``split`` is ``"train"`` or ``"val"`` (or ``"test"``)."""
        ...

    def collate_fn(self) -> Callable[[list[Any]], Any] | None:
        """Collate function for the DataLoader (None = PyTorch's default)."""
        ...

    def training_step(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[Tensor, dict[str, float]]:
        """Move ``batch`` to ``device``, run the model, return (loss, scalars to log)."""
        ...

    def evaluate(
        self, model: nn.Module, batches: Iterable[Any], device: torch.device, out_dir: Path | None
    ) -> dict[str, float]:
        """Score the model over ``batches`` (this rank's share under DDP; the task gathers across
        ranks) and return metrics; rank 0 writes per-sample predictions under ``out_dir``."""
        ...


TASKS: Registry[Callable[..., Task]] = Registry("task")


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Register a task builder ``fn(config) -> Task`` under ``name`` (the config's ``task`` key).

    The engine imports no task package: ``classification`` registers itself with
    :mod:`nlnet.engine`, ``detection`` when :mod:`nlnet.detection.task` is imported (the ``nlnet
    train`` / ``nlnet eval`` commands do).
    """
    return TASKS.register(name)


def build_task(name: str, config: Any) -> Task:
    """Build the task registered as ``name`` ("classification", "detection") from a config."""
    return TASKS.get(name)(config)
