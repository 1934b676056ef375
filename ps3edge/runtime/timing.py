"""The stage times of one look-close pass: `StageTimes`, stage name -> seconds, in run order.

Runners time their own calls (`StageRunner.last_inference_time()`, a whole-loop session's
`last_timings`); what runs between them in the pipeline (preprocessing, planning, assembly) is
measured here, so the one clock of a pass is this module's. A result reports the pass's times in
milliseconds (`ms()`), under the stage names `ps3edge run` prints.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable


class StageTimes:
    def __init__(self, seconds: dict | None = None):
        self.seconds: dict[str, float] = dict(seconds or {})

    def add(self, name: str, seconds: float) -> None:
        """Count `seconds` to stage `name` (a stage called several times sums its calls)."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def update(self, seconds: dict) -> None:
        for name, value in seconds.items():
            self.add(name, value)

    @contextlib.contextmanager
    def measure(self, name: str, synchronize: Callable[[], None] | None = None):
        """Time the block as stage `name`; `synchronize` waits for a device's queued work before
        the clock stops (an asynchronous GPU would otherwise be timed at the launch)."""
        start = time.perf_counter()
        yield
        if synchronize is not None:
            synchronize()
        self.add(name, time.perf_counter() - start)

    def ms(self) -> dict[str, float]:
        return {name: value * 1e3 for name, value in self.seconds.items()}
