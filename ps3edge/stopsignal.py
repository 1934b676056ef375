"""SIGTERM / SIGINT as an event, for the servers' main threads: they wait on it, then drain the
requests in flight before exiting, instead of dying mid-request. The handlers that were there
before are put back on exit."""

from __future__ import annotations

import signal
import threading
from typing import Optional


class StopSignals:
    """Within `with StopSignals() as stop:`, SIGTERM and SIGINT set `stop.event` and record the
    signal in `stop.signal`."""

    def __init__(self):
        self.event = threading.Event()
        self.signal: Optional[int] = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        self.signal = signum
        self.event.set()

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
