"""``nlnet eval``: the engine's command (:mod:`nlnet.engine.evaluate`) with the config's task
registered (:func:`nlnet.tasks.ensure_task`), so the engine never imports the detection package.
"""

from __future__ import annotations

import argparse
import contextlib

from nlnet.config import ConfigError, load_config
from nlnet.engine import evaluate
from nlnet.tasks import ensure_task

add_arguments = evaluate.add_arguments


def run(args: argparse.Namespace) -> int:
    # A config that does not load is reported by the engine's command itself.
    with contextlib.suppress(ConfigError, OSError):
        ensure_task(load_config(args.config, args.overrides).task)
    return evaluate.run(args)
