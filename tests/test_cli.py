"""The ``nlnet`` command's process defaults: OpenMP threads spin less at barriers."""

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
    "from nlnet.cli import openmp_defaults\n"
    "print(openmp_defaults(), os.environ.get('GOMP_SPINCOUNT'))\n"
)


def _probe(mode: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.strip()


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
    assert _probe(mode, **env) == expected


def test_main_applies_the_openmp_defaults_first(monkeypatch, capsys) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(nlnet.cli, "openmp_defaults", lambda: calls.append(True) or False)
    assert nlnet.cli.main([]) == 0
    assert calls == [True] and "usage: nlnet" in capsys.readouterr().out
