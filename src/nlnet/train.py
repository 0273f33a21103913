"""``nlnet train``: the engine's command (:mod:`nlnet.engine.trainer`) with every shipped task.

The command layer registers the tasks, so the engine never imports the detection package.
"""

from nlnet.detection import task as _detection_task  # noqa: F401  (registers "detection")
from nlnet.engine.trainer import add_arguments, run

__all__ = ["add_arguments", "run"]
