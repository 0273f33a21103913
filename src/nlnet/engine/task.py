"""What the training engine needs from a task (video classification, COCO detection).

The engine (optimiser, schedule, AMP, DDP, checkpoints, resume, progress, logging) is shared; a
task supplies the model, the data and what a training step and an evaluation mean.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset


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


_TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Register a task builder ``fn(config) -> Task`` under ``name`` (the config's ``task`` key)."""

    def wrap(fn: Callable[..., Task]) -> Callable[..., Task]:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered")
        _TASKS[name] = fn
        return fn

    return wrap


# Tasks that ship with nlnet, imported on first use so the engine does not import detection code
# (or torchvision's detection models) for a video run.
_BUILTIN_TASKS: dict[str, str] = {
    "classification": "nlnet.engine.classification",
    "detection": "nlnet.detection.task",
}


def build_task(name: str, config: Any) -> Task:
    """Build the task registered as ``name`` ("classification", "detection") from a config."""
    if name not in _TASKS and name in _BUILTIN_TASKS:
        importlib.import_module(_BUILTIN_TASKS[name])
    if name not in _TASKS:
        raise ValueError(
            f"unknown task {name!r}; expected one of {', '.join(sorted({*_TASKS, *_BUILTIN_TASKS}))}"
        )
    return _TASKS[name](config)
