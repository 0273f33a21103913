"""How many CPU threads a training step should use: measured, not guessed.

With another process busy on the machine, two OpenMP threads on two cores wait at every
parallel region's barrier for the one that shares its core: a training step can take 2–4× its
idle time, while one thread runs at its idle speed.  An idle machine prefers all cores.  A load
average only says what happened in the past minute, so the choice is made by timing steps:
:func:`choose_threads` for a step function (``nlnet demo``), :class:`ThreadTuner` for the
iterations of a running training (``nlnet train``, ``train.threads=0``), which measures again
every ``recheck`` iterations because the load changes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch


def _counts(candidates: Sequence[int]) -> list[int]:
    counts = list(dict.fromkeys(candidates))
    if not counts or any(not isinstance(n, int) or n < 1 for n in counts):
        raise ValueError(f"candidates must be positive thread counts, got {list(candidates)}")
    return counts


@dataclass(frozen=True)
class ThreadChoice:
    """The measured thread choice: the winner and the median seconds per step of each count."""

    threads: int
    seconds_per_step: dict[int, float]


def choose_threads(
    step: Callable[[], None],
    candidates: Sequence[int],
    *,
    repeats: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> ThreadChoice:
    """Time ``step`` under each thread count in ``candidates`` and keep the fastest.

    One warm-up step, then ``repeats`` rounds that alternate the counts (so a load that starts
    or stops during the measurement hits all of them alike); each count's time is its median
    step.  A count whose step took over 3× the best median so far is not timed again (two
    threads fighting a busy core can be 10× slower; no need to confirm that three times).
    Ties go to the earlier candidate.  Leaves PyTorch at the chosen count.
    """
    tuner = ThreadTuner(candidates, repeats=repeats, clock=clock)
    torch.set_num_threads(tuner.counts[0])  # the warm-up's count
    while tuner.choice is None:
        with tuner.iteration():
            step()
    return tuner.choice


class ThreadTuner:
    """Chooses the thread count from the training iterations themselves (no extra steps).

    Wrap each iteration in :meth:`iteration`.  The first one is a warm-up (first-call
    allocations, kernel selection); then ``repeats`` rounds alternate the ``candidates``, each
    count's median wins (a count over 3× the best median so far is not timed again), and the
    winner is kept for ``recheck`` iterations before the next measurement.  Every measured
    iteration is a real one: measuring costs only the time of the slower counts' few steps.
    """

    def __init__(
        self,
        candidates: Sequence[int],
        *,
        repeats: int = 3,
        recheck: int = 2000,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if repeats < 1 or recheck < 1:
            raise ValueError(f"repeats and recheck must be positive, got {repeats}, {recheck}")
        self.counts = _counts(candidates)
        self.repeats, self.recheck, self.clock = repeats, recheck, clock
        #: The latest choice (None until the first measurement ends).
        self.choice: ThreadChoice | None = None
        self._plan: list[int | None] = [None]  # None: the untimed warm-up
        self._times: dict[int, list[float]] = {}
        self._since = 0
        self._schedule()

    def _schedule(self) -> None:
        self._times = {n: [] for n in self.counts}
        self._plan += [n for _ in range(self.repeats) for n in self.counts]

    def _next(self) -> int | None:
        """The count to time next, skipping counts already clearly slower."""
        while self._plan and self._plan[0] is not None:
            n = self._plan[0]
            done = [statistics.median(t) for t in self._times.values() if t]
            if self._times[n] and self._times[n][-1] > 3 * min(done):
                self._plan.pop(0)
                continue
            return n
        return None

    @contextmanager
    def iteration(self) -> Iterator[None]:
        """Around one training iteration: sets the thread count it runs with, times it."""
        if not self._plan:
            self._since += 1
            if self._since >= self.recheck:
                self._schedule()
        if self._plan and self._plan[0] is None:  # the warm-up, untimed
            self._plan.pop(0)
            yield
            return
        n = self._next()
        if n is None:
            yield
            return
        torch.set_num_threads(n)
        start = self.clock()
        yield
        self._times[n].append(self.clock() - start)
        self._plan.pop(0)
        if self._next() is None:  # every count timed (or skipped as clearly slower)
            self._plan.clear()
            self._decide()

    def _decide(self) -> None:
        per = {n: statistics.median(t) for n, t in self._times.items() if t}
        best = min(per, key=lambda n: (per[n], self.counts.index(n)))
        torch.set_num_threads(best)
        self.choice = ThreadChoice(best, per)
        self._times, self._since = {}, 0
