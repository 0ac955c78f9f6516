"""Wall-clock accounting of a run: its training time (evaluation and checkpoint time left out and reported
apart), and the time budget that sizes a run to train.time_budget_s seconds of that training time.

The budget counts from the loop's start, so the first step's compilation is part of it (a recipe that
compiles longer pays for it); its step rate is measured from the step after compilation (and after any
shorter-window steps of train.seq_len_warmup_steps, which are faster). The step count is planned once the
first steps have taken PLAN_AT of the budget, and planned again at each fraction of REPLAN_AT from the steps
since the plan before. A resumed run's clock goes on from the time its checkpoint recorded (the steps an attempt
ran past its last checkpoint are counted when run again); it keeps the plan the checkpoint holds, and plans
again at the fractions still ahead, from its own steps after the one that compiles.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np

PLAN_AT = 0.05  # of the budget, measured over at least MIN_STEPS steps
MIN_STEPS = 5
REPLAN_AT = (0.5, 0.8, 0.95)  # each from the rate since the plan before: a machine whose speed changes is followed


class Clock:
    """Training time: wall time since the loop started, less what ran inside `excluding(...)` blocks, plus the
    time `before` (report()'s keys) that the attempts before a resumed checkpoint spent."""

    def __init__(self, before: dict | None = None):
        before = before or {}
        self.start = time.perf_counter() - before.get("train_time_s", 0.0)
        self.excluded = {k: before.get(f"{k}_time_s", 0.0) for k in ("eval", "checkpoint")}
        self.start -= sum(self.excluded.values())

    @contextlib.contextmanager
    def excluding(self, what: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.excluded[what] += time.perf_counter() - t0

    def train_s(self) -> float:
        return time.perf_counter() - self.start - sum(self.excluded.values())

    def report(self) -> dict[str, float]:
        return {"train_time_s": self.train_s(), **{f"{k}_time_s": v for k, v in self.excluded.items()}}


class Budget:
    """Proposes the run's step count from the measured step rate; `accept` records a plan that was adopted."""

    def __init__(self, seconds: float, clock: Clock, measure_from: int, planned: bool = False):
        """`planned`: a resumed run's checkpoint holds a plan; the next is due at the first REPLAN_AT ahead."""
        self.seconds, self.clock, self.measure_from = seconds, clock, measure_from
        self.mark: tuple[int, float] | None = None  # (step, training seconds) where the rate's measurement began
        self.plans = 1 + sum(clock.train_s() >= f * seconds for f in REPLAN_AT) if planned else 0
        self.pending: tuple[int, float] | None = None  # where the last proposal was made

    def propose(self, done: int) -> int:
        """The planned step count if it is time to plan after step `done` completed, else 0."""
        if self.plans > len(REPLAN_AT) or done < self.measure_from:
            return 0
        elapsed = self.clock.train_s()
        if self.mark is None:
            self.mark = (done, elapsed)
            return 0
        steps, seconds = done - self.mark[0], elapsed - self.mark[1]
        # The first plan once the rate is measured well enough (or time is running out), then at each REPLAN_AT.
        first = steps >= MIN_STEPS and seconds >= PLAN_AT * self.seconds or seconds >= 2 * PLAN_AT * self.seconds
        later = self.plans and elapsed >= REPLAN_AT[self.plans - 1] * self.seconds
        if not (later or not self.plans and (first or elapsed >= REPLAN_AT[0] * self.seconds)) or steps <= 0:
            return 0
        self.pending = (done, elapsed)
        return done + max(1, int((self.seconds - elapsed) * steps / max(seconds, 1e-9)))

    def accept(self) -> None:
        """The proposal was adopted: the next plan measures the rate from here."""
        self.plans += 1
        self.mark = self.pending


def agree(value: int, process_count: int) -> int:
    """Process 0's value on every process (each measured its own clock; the plan must be one)."""
    if process_count == 1:
        return value
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
