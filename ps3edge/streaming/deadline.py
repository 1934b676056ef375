"""How many look-close steps a stream step runs under a per-frame deadline (`--deadline MS`).

The algorithm is stated here; the code is exactly that.

Cost. A loop step of B frames and s look-close steps is predicted to take

    D(B, s) = o + B * (f + s * h)        milliseconds

    f  per frame, everything but the highres stage (preprocess, compare, lowres, selector,
       planning, assemble): the pass's timings_ms without highres, over B
    h  per frame and look-close step: the pass's highres time over B * s
    o  per loop step, what the stages' own times do not hold (the loop, the records): the
       step's wall time less the sum of its timings_ms, at least 0

Each is a running estimate, updated after every step that ran a pass: new = w * measured +
(1 - w) * old, w = STREAM_COST_WEIGHT (0.3); the first measurement is taken as it is. The times
are the runners' own (results' timings_ms), so a machine that gets busier raises them and the
steps fall.

Choice. A frame's latency is its wait in the mailbox (arrival to the step's start) plus the
step. A frame taken now waited `waited` (the longest wait among the step's frames); a frame that
arrives while this step runs waits up to D and then its own step. So a step gets the budget

    budget = margin * min(deadline - waited, deadline / 2)          margin = STREAM_DEADLINE_MARGIN

and runs s = the largest s in [floor, ceiling] with D(B, s) <= budget. ceiling: the steps the
look-close settings ask for; floor: STREAM_DEADLINE_FLOOR_STEPS = 1. The floor is 1, not 0,
because the pipeline runs no 0-step pass (NUM_LOOK_CLOSE must be 1 or more; a low-res-only
result is not one it gives). When even D(B, floor) is over the budget, the step runs the floor
and says so (`fits` False: the record's `deadline_fits`); whether the frame then missed is its
`deadline_met`. Before any step has been measured the floor runs, and its times are the first
estimates.

More sources make B larger, so s falls; a busier machine raises f and h, so s falls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .. import defaults
from ..errors import Ps3EdgeError

HIGHRES = "highres"


@dataclass
class Choice:
    steps: int
    predicted_ms: Optional[float]      # D(B, steps); None before any measurement
    fits: bool                         # D(B, steps) <= the budget (True before any measurement)


class StepCost:
    """The running estimates f, h, o of the module docstring."""

    def __init__(self, weight: float = defaults.STREAM_COST_WEIGHT):
        self.weight = weight
        self.frame_ms: Optional[float] = None        # f
        self.step_ms: Optional[float] = None         # h
        self.overhead_ms: Optional[float] = None     # o

    def _mix(self, old: Optional[float], new: float) -> float:
        return new if old is None else self.weight * new + (1 - self.weight) * old

    def observe(self, frames: int, steps: int, timings_ms: dict, wall_ms: Optional[float] = None) -> None:
        """A pass of `frames` frames and `steps` look-close steps took `timings_ms` (its stage
        times) and the loop step `wall_ms` in all."""
        if frames < 1:
            return
        highres = float(timings_ms.get(HIGHRES, 0.0))
        stages = float(sum(timings_ms.values()))
        self.frame_ms = self._mix(self.frame_ms, (stages - highres) / frames)
        if steps >= 1:
            self.step_ms = self._mix(self.step_ms, highres / (frames * steps))
        if wall_ms is not None:
            self.overhead_ms = self._mix(self.overhead_ms, max(0.0, wall_ms - stages))

    @property
    def known(self) -> bool:
        return self.frame_ms is not None and self.step_ms is not None

    def predict(self, frames: int, steps: int) -> float:
        return (self.overhead_ms or 0.0) + frames * (self.frame_ms + steps * self.step_ms)


class DeadlineRule:
    """The choice of the module docstring, for one stream."""

    def __init__(self, deadline_ms: float, ceiling: int, floor: int = defaults.STREAM_DEADLINE_FLOOR_STEPS,
                 margin: float = defaults.STREAM_DEADLINE_MARGIN, cost: Optional[StepCost] = None):
        if not deadline_ms > 0:
            raise Ps3EdgeError(f"--deadline must be a number of milliseconds above 0, got {deadline_ms}")
        self.deadline_ms, self.floor, self.margin = float(deadline_ms), floor, margin
        self.ceiling = max(floor, ceiling)
        self.cost = cost or StepCost()

    def budget(self, waited_ms: float) -> float:
        return self.margin * min(self.deadline_ms - waited_ms, self.deadline_ms / 2)

    def choose(self, frames: int, waited_ms: float = 0.0) -> Choice:
        if not self.cost.known:
            return Choice(self.floor, None, True)
        budget = self.budget(waited_ms)
        for steps in range(self.ceiling, self.floor - 1, -1):
            predicted = self.cost.predict(frames, steps)
            if predicted <= budget:
                return Choice(steps, predicted, True)
        return Choice(self.floor, self.cost.predict(frames, self.floor), False)
