"""The dataset factory: ``build_dataset(name, **kwargs)`` over registered dataset builders.

Item contract shared by every video dataset (the engine relies on it): ``dataset[i]`` returns a
dict with

* ``clip``: float tensor (C, T, H, W), normalised;
* ``target``: int64 scalar (single-label) or float (num_classes,) multi-hot (multi-label);
* ``index``: int, the *video* index (several test views share it), in ``range(len(dataset.videos))``;
* ``view``: int, the view number within that video (0 in training);
* ``valid``: bool, False when the video could not be decoded in a test/val pass (the clip is then
  zeros and the evaluator must not score it as a real view).

``dataset[(i, seed)]`` does the same with every random draw taken from ``torch.Generator`` seeded
with ``seed``: the engine uses this to make a run reproducible and resumable whatever the number
of workers.  Datasets also expose ``num_classes``, ``multi_label``, ``classes`` (names) and
``videos`` (ids, one per video).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from nlnet.registry import Registry

DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")


def register_dataset(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator registering a dataset class or builder under ``name``."""
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    """Registered dataset names (importing this module imported :mod:`nlnet.data`, which
    registers the builders)."""
    return DATASETS.names()


def build_dataset(name: str, **kwargs: Any) -> Dataset:
    """Build the dataset registered as ``name`` with its keyword arguments."""
    return DATASETS.get(name)(**kwargs)
