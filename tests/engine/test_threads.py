"""``nlnet.engine.threads``: the thread count is measured from training iterations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine_helpers import tiny_config, write_config
from nlnet.cli import main
from nlnet.engine.threads import ThreadTuner


class _FakeSteps:
    """Iterations whose duration depends on the thread count they run with (a fake clock)."""

    def __init__(self, cost: dict[int, float]) -> None:
        self.cost, self.now, self.calls = cost, 0.0, []

    def clock(self) -> float:
        return self.now

    def run(self, tuner: ThreadTuner, count: int) -> None:
        for _ in range(count):
            with tuner.iteration():
                n = torch.get_num_threads()
                self.calls.append(n)
                self.now += self.cost[n]


def test_tuner_picks_the_faster_count_from_real_iterations_and_measures_again() -> None:
    """Busy machine (2 threads 2.5× slower): 1 thread after one warm-up and a few iterations,
    the slow count not timed again; when the load goes away the recheck moves back to 2."""
    torch.set_num_threads(2)
    steps = _FakeSteps({1: 0.4, 2: 1.0})
    tuner = ThreadTuner([2, 1], repeats=3, recheck=5, clock=steps.clock)
    steps.run(tuner, 1)  # warm-up, at the current count, not timed
    assert tuner.choice is None and steps.calls == [2]
    steps.run(tuner, 4)  # 2, 1, 2, 1: 2 is under 3x slower, so it is timed again
    assert tuner.choice is None
    steps.run(tuner, 2)
    assert tuner.choice is not None and tuner.choice.threads == 1
    assert tuner.choice.seconds_per_step == {2: pytest.approx(1.0), 1: pytest.approx(0.4)}
    assert torch.get_num_threads() == 1
    assert steps.calls[1:] == [2, 1, 2, 1, 2, 1]
    steps.calls.clear()
    steps.run(tuner, 4)  # the choice holds until the recheck
    assert steps.calls == [1, 1, 1, 1]
    steps.cost = {1: 0.4, 2: 0.25}  # the other process ended
    steps.run(tuner, 7)
    assert tuner.choice.threads == 2 and torch.get_num_threads() == 2


def test_tuner_skips_a_count_that_is_clearly_slower() -> None:
    torch.set_num_threads(2)
    steps = _FakeSteps({1: 0.1, 2: 1.0})
    tuner = ThreadTuner([2, 1], repeats=3, clock=steps.clock)
    steps.run(tuner, 6)
    assert tuner.choice is not None and tuner.choice.threads == 1
    assert steps.calls == [2, 2, 1, 1, 1, 1]  # warm-up, 2 once (10x slower), 1 three times
    with pytest.raises(ValueError, match="positive thread counts"):
        ThreadTuner([0, 2])


def test_train_measures_threads_unless_given_and_restores_the_count(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``train.threads=0`` (default) on a multi-core CPU, not deterministic: the log names the
    measured choice; a given count is used as is; the process's count is restored after."""
    torch.set_num_threads(2)
    out = tmp_path / "run"
    raw = tiny_config(out, train={"deterministic": False, "eval_period": 0}, solver={"max_iter": 9})
    cfg = write_config(tmp_path / "c.yaml", raw)
    assert main(["train", str(cfg)]) == 0
    err = capsys.readouterr().err
    assert "CPU threads: " in err and "measured per iteration: 2: " in err
    assert torch.get_num_threads() == 2
    assert main(["train", str(cfg), "train.threads=1", "train.resume=none"]) == 0
    assert "CPU threads" not in capsys.readouterr().err
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and torch.get_num_threads() == 2
    assert main(["train", str(cfg), "train.threads=-1"]) == 2
    assert "train.threads must be 0 (measured) or a thread count, got -1" in capsys.readouterr().err
