"""``nlnet train CONFIG [key=value ...]``: the engine's training loop (:mod:`nlnet.engine.trainer`).

The command registers the config's task (:func:`nlnet.cli.tasks.ensure_task`), so the engine never
imports the detection package.
"""

from __future__ import annotations

import argparse
import os
import sys

from nlnet.cli.tasks import ensure_task
from nlnet.config import ConfigError, load_config
from nlnet.engine import distributed as dist
from nlnet.engine.trainer import Interrupted, NonFiniteLossError, Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML recipe, e.g. configs/kinetics/i3d_r50_nl5_32x2.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. solver.base_lr=0.005",
    )


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        ensure_task(cfg.task)
        trainer = Trainer(cfg)
        trainer.run()
    except ConfigError as e:
        print(f"nlnet train: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"nlnet train: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"nlnet train: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        if _launched_rank() == 0:
            print(
                f"nlnet train: stopped by signal {e.signum} at iteration {e.iteration}; "
                f"checkpoint {e.path} written; run the same command again to resume",
                file=sys.stderr,
            )
        return 128 + int(e.signum)
    finally:
        dist.shutdown()
    if _launched_rank() == 0:
        print(f"nlnet train: done; run directory {cfg.train.output_dir}", file=sys.stderr)
    return 0


def _launched_rank() -> int:
    # After the process group is gone, torchrun's RANK still says who we were.
    return int(os.environ.get("RANK", "0"))
