"""``nlnet.engine.memory``: CPU training gives freed blocks of 4 MiB and more back to the system
(glibc's mmap threshold), only where PyTorch's allocations use huge pages."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine_helpers import tiny_config, write_config
from nlnet.cli import main
from nlnet.engine import memory
from nlnet.engine.memory import MemoryPolicy, decide, release_freed_memory


class _FakeLibc:
    """Records ``mallopt`` calls; returns ``ok`` (glibc: 1 when the value was taken)."""

    def __init__(self, ok: int = 1) -> None:
        self.ok, self.calls = ok, []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.ok


@pytest.fixture(autouse=True)
def _no_user_malloc_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)


def _sysfs(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "enabled"
    path.write_text(text + "\n")
    return path


@pytest.mark.parametrize(
    ("env", "sysfs", "applied", "reason"),
    [
        ("1", "always [madvise] never", True, "4 MiB and more are unmapped"),
        ("true", "[always] madvise never", True, "4 MiB and more are unmapped"),
        (None, "[always] madvise never", False, "THP_MEM_ALLOC_ENABLE is not set"),
        ("0", "[always] madvise never", False, "THP_MEM_ALLOC_ENABLE is not set"),
        ("1", "always madvise [never]", False, "transparent huge pages are off"),
        ("1", None, False, "transparent huge pages are off"),  # no such file
    ],
)
def test_decide_applies_only_with_huge_page_allocations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env, sysfs, applied, reason
) -> None:
    if env is None:
        monkeypatch.delenv(memory.THP_ENV, raising=False)
    else:
        monkeypatch.setenv(memory.THP_ENV, env)
    path = _sysfs(tmp_path, sysfs) if sysfs is not None else tmp_path / "missing"
    policy = decide(_FakeLibc(), path)
    assert policy.applied is applied and reason in policy.reason


@pytest.mark.parametrize(
    ("name", "value", "named"),
    [
        ("MALLOC_MMAP_THRESHOLD_", "65536", "MALLOC_MMAP_THRESHOLD_"),
        ("MALLOC_TRIM_THRESHOLD_", "0", "MALLOC_TRIM_THRESHOLD_"),
        (
            "GLIBC_TUNABLES",
            "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=1048576",
            "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1048576",
        ),
    ],
)
def test_the_users_malloc_settings_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, named: str
) -> None:
    monkeypatch.setenv(memory.THP_ENV, "1")
    monkeypatch.setenv(name, value)
    libc = _FakeLibc()
    with release_freed_memory(libc=libc, sysfs=_sysfs(tmp_path, "[always] madvise never")) as p:
        assert not p.applied and named in p.reason and "chooses glibc's thresholds" in p.reason
    assert libc.calls == []
    if name != "GLIBC_TUNABLES":
        monkeypatch.delenv(name)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")  # other tunables do not count
    assert decide(_FakeLibc(), _sysfs(tmp_path, "[always] madvise never")).applied


def test_decide_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "glibc", lambda: None)
    assert decide() == MemoryPolicy(False, "not glibc on Linux")


def test_release_sets_the_thresholds_and_leaves_glibcs_ceiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(memory.THP_ENV, "1")
    sysfs, libc = _sysfs(tmp_path, "[always] madvise never"), _FakeLibc()
    with release_freed_memory(libc=libc, sysfs=sysfs) as policy:
        assert policy.applied
        assert libc.calls == [(-3, 4 << 20), (-1, 8 << 20)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    assert libc.calls[2:] == [(-3, 32 << 20), (-1, 64 << 20)]
    with pytest.raises(RuntimeError), release_freed_memory(libc=(libc := _FakeLibc()), sysfs=sysfs):
        raise RuntimeError  # an error inside still leaves the ceiling
    assert libc.calls[2:] == [(-3, 32 << 20), (-1, 64 << 20)]


def test_release_changes_nothing_when_not_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(memory.THP_ENV, "1")
    sysfs = _sysfs(tmp_path, "[always] madvise never")
    libc = _FakeLibc()
    with release_freed_memory(False, libc=libc, sysfs=sysfs) as policy:
        assert not policy.applied and "train.release_memory=false" in policy.reason
    refused = _FakeLibc(ok=0)
    with release_freed_memory(libc=refused, sysfs=sysfs) as policy:
        assert not policy.applied and "refused" in policy.reason
    monkeypatch.delenv(memory.THP_ENV)
    with release_freed_memory(libc=libc, sysfs=sysfs) as policy:
        assert not policy.applied
    assert libc.calls == [] and len(refused.calls) == 1  # the refused one was never undone


_PROBE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from nlnet.engine.memory import release_freed_memory

    def rss_mib():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    def freed_mib():
        big = torch.ones(16 << 18)  # 16 MiB: its free raises glibc's dynamic threshold
        del big
        block = torch.ones(8 << 18)  # 8 MiB, touched
        before = rss_mib()
        del block
        return before - rss_mib()

    sysfs = Path(sys.argv[2])
    if sys.argv[1] == "release":
        with release_freed_memory(sysfs=sysfs) as policy:
            assert policy.applied, policy
            print(f"{freed_mib():.1f}")
    else:
        print(f"{freed_mib():.1f}")
    """
)


@pytest.mark.skipif(memory.glibc() is None, reason="needs glibc on Linux")
def test_freed_blocks_go_back_to_the_system_only_when_released(tmp_path: Path) -> None:
    """A real process: an 8 MiB tensor's memory leaves the RSS when it is freed with the policy
    applied; without it glibc keeps it (the contrast shows the probe can see the difference)."""
    sysfs = _sysfs(tmp_path, "[always] madvise never")
    env = {**os.environ, memory.THP_ENV: "1"}

    def run(mode: str) -> float:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE, mode, str(sysfs)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return float(out.stdout.strip())

    assert run("release") > 7.5
    assert run("keep") < 1.0


def test_train_logs_the_policy_and_holds_it_for_the_loop_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    events: list[tuple[str, bool]] = []

    @contextmanager
    def recording(enabled: bool = True) -> Iterator[MemoryPolicy]:
        events.append(("enter", enabled))
        yield MemoryPolicy(enabled, "test policy")
        events.append(("exit", enabled))

    monkeypatch.setattr("nlnet.engine.trainer.release_freed_memory", recording)
    raw = tiny_config(
        tmp_path / "run", train={"eval_period": 0, "threads": 1}, solver={"max_iter": 2}
    )
    cfg = write_config(tmp_path / "c.yaml", raw)
    assert main(["train", str(cfg)]) == 0
    assert "CPU memory: released (test policy)" in capsys.readouterr().err
    assert main(["train", str(cfg), "train.release_memory=false", "train.resume=none"]) == 0
    assert "CPU memory: kept (test policy)" in capsys.readouterr().err
    assert events == [("enter", True), ("exit", True), ("enter", False), ("exit", False)]
