"""Benchmark the non-local operation: ``auto`` vs the explicit N×N' matrix (issue 2).

    PYTHONPATH=src python benchmarks/nonlocal_op.py [--quick] [--forms ...] [--sizes ...]

Same as ``nlnet bench``; see :mod:`nlnet.benchmark` for what is measured and how.
"""

from __future__ import annotations

import argparse
import sys

from nlnet import benchmark

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchmark.add_arguments(parser)
    sys.exit(benchmark.run(parser.parse_args()))
