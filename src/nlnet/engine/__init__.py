"""§4.1, §5: training loop, evaluation, checkpoints, distributed, precise BN.

``nlnet train`` runs :class:`Trainer` and ``nlnet eval`` runs :func:`evaluate` for the task named
by the config's ``task`` key (``"classification"`` is registered here; other packages register
theirs with :func:`register_task`).
"""

from nlnet.engine import classification as _classification  # noqa: F401  (registers the task)
from nlnet.engine.task import Task, build_task, register_task

__all__ = ["Task", "build_task", "register_task"]
