"""The ``nlnet`` command's process defaults: OpenMP threads spin less at barriers; PyTorch's
large CPU allocations use transparent huge pages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import nlnet.cli

_PROBE = (
    "import os, sys\n"
    "if sys.argv[1] == 'torch-first':\n"
    "    import torch\n"
    "from nlnet.cli import huge_page_defaults, openmp_defaults\n"
    "print(openmp_defaults(), os.environ.get('GOMP_SPINCOUNT'))\n"
    "print(huge_page_defaults(), os.environ.get('THP_MEM_ALLOC_ENABLE'))\n"
)


def _probe(mode: str, **env: str) -> str:
    names = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE")
    base = {k: v for k, v in os.environ.items() if k not in names}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.strip().splitlines()


@pytest.mark.parametrize(
    ("mode", "env", "expected"),
    [
        ("plain", {}, f"True {nlnet.cli.GOMP_SPINCOUNT}"),
        ("plain", {"GOMP_SPINCOUNT": "7"}, "False 7"),  # the user's choice wins
        ("plain", {"OMP_WAIT_POLICY": "active"}, "False None"),
        ("torch-first", {}, "False None"),  # too late: libgomp already read its environment
    ],
)
def test_openmp_defaults_set_the_spin_count_only_before_torch_and_the_user(
    mode, env, expected
) -> None:
    assert _probe(mode, **env)[0] == expected


@pytest.mark.parametrize(
    ("mode", "env", "expected"),
    [
        ("plain", {}, "True 1"),
        ("plain", {"THP_MEM_ALLOC_ENABLE": "0"}, "False 0"),  # the user's choice wins
        ("torch-first", {}, "False None"),  # too late: PyTorch may have read it already
    ],
)
def test_huge_page_defaults_only_before_torch_and_the_user(mode, env, expected) -> None:
    assert _probe(mode, **env)[1] == expected


def test_the_cli_names_the_variable_the_memory_policy_reads() -> None:
    from nlnet.engine import memory

    assert nlnet.cli.THP_ENV == memory.THP_ENV


def test_main_applies_the_openmp_defaults_first(monkeypatch, capsys) -> None:
    calls: list[str] = []
    monkeypatch.setattr(nlnet.cli, "openmp_defaults", lambda: calls.append("omp") or False)
    monkeypatch.setattr(nlnet.cli, "huge_page_defaults", lambda: calls.append("thp") or False)
    assert nlnet.cli.main([]) == 0
    assert calls == ["omp", "thp"] and "usage: nlnet" in capsys.readouterr().out
