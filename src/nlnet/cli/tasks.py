"""The tasks nlnet ships, for the commands that build one from a config (train, eval, visualize).

The engine knows a task only through its registry (:func:`nlnet.engine.register_task`) and
imports no task package: ``classification`` registers itself with :mod:`nlnet.engine`,
``detection`` when :mod:`nlnet.detection.task` is imported.  :func:`ensure_task` imports a
shipped task's module on first use, so a video run never loads torchvision's detection models.
"""

from __future__ import annotations

import importlib

from nlnet.engine.task import TASKS

SHIPPED_TASKS: dict[str, str] = {
    "classification": "nlnet.engine.classification",
    "detection": "nlnet.detection.task",
}


def ensure_task(name: str) -> None:
    """Register the shipped task ``name`` if it is not yet (unknown names are left to the engine,
    whose error lists the registered ones)."""
    if name not in TASKS and name in SHIPPED_TASKS:
        importlib.import_module(SHIPPED_TASKS[name])
