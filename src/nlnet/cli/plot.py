"""``nlnet plot``: train/val error curves of runs, as in Figure 4 (:mod:`nlnet.viz.curves`)."""

from __future__ import annotations

import argparse
import sys

from nlnet.viz.curves import plot_runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories (train.output_dir)"
    )
    parser.add_argument("--out", default="curves.png", help="PNG to write (default: curves.png)")
    parser.add_argument("--key", default="error", help="metric to plot (default: error, in %%)")
    parser.add_argument("--labels", nargs="*", default=None, help="legend names, one per run")


def run(args: argparse.Namespace) -> int:
    try:
        out = plot_runs(args.runs, args.out, args.key, args.labels)
    except (FileNotFoundError, ValueError) as e:
        print(f"nlnet plot: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0
