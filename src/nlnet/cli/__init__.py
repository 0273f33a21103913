"""The ``nlnet`` command.

Each sub-command is a module of this package (or one of the applications ``nlnet.predict``,
``nlnet.features``, ``nlnet.demo``, ``nlnet.benchmark``) exposing ``add_arguments(parser)`` and
``run(args) -> int``, which parse the command line and call library functions taking plain
arguments. This file only lists them, so ``nlnet --help`` stays fast (a module is imported when
its command runs).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# name -> (module implementing add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": (
        "nlnet.benchmark",
        "benchmark the NL operation (auto vs explicit), or a whole model (--model)",
    ),
    "detect": ("nlnet.cli.detect", "draw a detector's boxes, masks and keypoints on images"),
    "demo": ("nlnet.demo", "train C2D vs C2D + non-local on a synthetic task (CPU, minutes)"),
    "visualize": ("nlnet.cli.visualize", "draw where a non-local block looks (Figure 3)"),
    "convert": ("nlnet.cli.convert", "convert Caffe2 / PySlowFast / mmaction2 weights to nlnet"),
    "flops": ("nlnet.cli.flops", "parameters and FLOPs per stage of a model (Table 2e costs)"),
    "data-check": (
        "nlnet.cli.data_check",
        "scan a Kinetics/Charades/folder download: missing, unreadable",
    ),
    "train": ("nlnet.cli.train", "train a model from a YAML recipe (key=value overrides)"),
    "eval": (
        "nlnet.cli.eval",
        "evaluate a checkpoint with the test protocol (clips x crops)",
    ),
    "predict": ("nlnet.predict", "classify videos with released or trained weights (top-5 labels)"),
    "extract-features": (
        "nlnet.features",
        "write pooled res5 (and chosen block) features of videos to .npy/.pt",
    ),
    "plot": ("nlnet.cli.plot", "plot train/val error against iterations for runs (Figure 4)"),
    "weights": ("nlnet.cli.weights", "list / download / convert the released models' weights"),
}


def build_parser() -> argparse.ArgumentParser:
    from nlnet import __version__

    parser = argparse.ArgumentParser(
        prog="nlnet",
        description="Non-local Neural Networks (Wang et al., CVPR 2018): models, training, tools.",
    )
    parser.add_argument("--version", action="version", version=f"nlnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        # Arguments are added lazily below, only for the command being run.
    return parser


#: OpenMP threads spin this many times at a barrier before sleeping (libgomp's default: 300000).
GOMP_SPINCOUNT = "30000"


def openmp_defaults() -> bool:
    """Let idle OpenMP threads sleep sooner; True if set (before torch loads libgomp).

    With PyTorch's default of one thread per core and another busy process on the machine, a
    thread that has finished its share spins at the barrier for libgomp's 300000 rounds while
    the thread it waits for shares a core with the other process: a training step of I3D-NL5 R50
    at 8×224² on 2 cores took 3.4 s instead of 0.36 s idle.  A tenth of the spinning leaves the
    idle time as it was and took it to 1.35 s (BENCHMARKS.md, "Whole model"; OMP_WAIT_POLICY=
    PASSIVE: 1.1 s, but 1.5× slower idle).  Not applied when torch is already imported or the
    user chose (``GOMP_SPINCOUNT`` or ``OMP_WAIT_POLICY`` set).
    """
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = GOMP_SPINCOUNT
    return True


#: PyTorch's switch for huge-page CPU allocations (``nlnet.engine.memory.THP_ENV``; named here
#: because importing ``nlnet.engine`` loads torch, and this must be set before that).
THP_ENV = "THP_MEM_ALLOC_ENABLE"


def huge_page_defaults() -> bool:
    """Let PyTorch back CPU allocations of 2 MiB and more with transparent huge pages; True if
    set (before torch loads: PyTorch reads ``THP_MEM_ALLOC_ENABLE`` once).

    Training then returns its freed memory to the system at no cost in time
    (:mod:`nlnet.engine.memory`, ``train.release_memory``); it also took ~60 MiB off a training
    step's peak RSS by itself.  Not applied when torch is already imported or the user set it.
    """
    if "torch" in sys.modules or THP_ENV in os.environ:
        return False
    os.environ[THP_ENV] = "1"
    return True


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    openmp_defaults()
    huge_page_defaults()
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help", "--version") or argv[0] not in COMMANDS:
        args = parser.parse_args(argv)  # prints help / version / the unknown-command error
        parser.print_help()
        return 0 if not argv else 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"nlnet {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    # intermixed: `nlnet eval CONFIG --checkpoint CK key=value ...` (options between positionals)
    args = sub.parse_intermixed_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
