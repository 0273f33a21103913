"""Shared test configuration.

Subprocesses started by tests (``python -m nlnet ...``, ``torchrun``) import nlnet from this
checkout's ``src`` even when another copy is installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[1] / "src"
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p
)


@pytest.fixture(autouse=True)
def _thread_count_restored() -> Iterator[None]:
    """Every test starts with the session's thread count: in-process ``nlnet demo``/``nlnet
    train`` runs set their measured count, which changed later tests' kernels (and layouts)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test with one intra-op thread (clip-sized ops; DataLoader workers use one too)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
