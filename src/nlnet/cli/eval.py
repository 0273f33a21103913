"""``nlnet eval CONFIG --checkpoint CK``: the test protocol of paper §4.2
(:func:`nlnet.engine.evaluate.evaluate`), with the config's task registered first
(:func:`nlnet.cli.tasks.ensure_task`), so the engine never imports the detection package.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from nlnet.cli.tasks import ensure_task
from nlnet.config import ConfigError, load_config
from nlnet.engine import distributed as dist
from nlnet.engine.evaluate import evaluate
from nlnet.models import CheckpointFormatError, WeightsMismatchError


def run(args: argparse.Namespace) -> int:
    # A config that does not load is reported below.
    with contextlib.suppress(ConfigError, OSError):
        ensure_task(load_config(args.config, args.overrides).task)
    return _run(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the YAML recipe the model was trained with")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. eval.test_crop=full",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="engine checkpoint (.pt), converted weights, or a released-weights name",
    )
    parser.add_argument(
        "--out", default=None, help="directory for predictions.jsonl and metrics.json"
    )
    parser.add_argument(
        "--split", default="test", choices=["test", "val"], help="data set mode (default: test)"
    )


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        result = evaluate(cfg, args.checkpoint, args.out, args.split)
        main = dist.is_main()
    except ConfigError as e:
        print(f"nlnet eval: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, WeightsMismatchError, CheckpointFormatError) as e:
        print(f"nlnet eval: {e}", file=sys.stderr)
        return 2
    finally:
        dist.shutdown()
    if main:
        print(json.dumps(result, indent=2))
    return 0
