"""The stream's running numbers per source: frames in and processed, dropped, reconnections,
input and processed frame rates over the last few seconds, latency p50 / p99 over the last
frames. Bounded: a long run keeps a fixed window of each, never the whole history.

Read from another thread (the live table's refresh) while the loop updates it: `rows()` takes a
consistent snapshot under the lock."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import defaults


@dataclass(frozen=True)
class SourceRow:
    """One source's numbers at one moment (fps: None until a window has passed)."""
    name: str
    state: str
    arrived: int
    processed: int
    dropped: int
    reconnects: int
    input_fps: Optional[float]
    processed_fps: Optional[float]
    p50_ms: Optional[float]
    p99_ms: Optional[float]
    last_error: Optional[str]
    reused: int = 0                   # frames given the last computed result (--reuse)
    missed: int = 0                   # frames over the deadline (--deadline)


class StreamStats:
    def __init__(self, sources):
        self._sources = sources                       # SourceThread list: their mailboxes count arrivals and drops
        self._lock = threading.Lock()
        self._processed = [0] * len(sources)
        self._reused = [0] * len(sources)
        self._missed = [0] * len(sources)
        self._latency = [deque(maxlen=defaults.STREAM_LATENCY_WINDOW) for _ in sources]
        # (time, arrived, processed) per source, one sample per refresh at most, a window's worth
        self._samples = [deque(maxlen=64) for _ in sources]
        self.started = time.monotonic()

    def processed(self, index: int, latency_ms: float, reused: bool = False, missed: bool = False) -> None:
        with self._lock:
            self._processed[index] += 1
            self._reused[index] += int(reused)
            self._missed[index] += int(missed)
            self._latency[index].append(latency_ms)

    @property
    def total_processed(self) -> int:
        return sum(self._processed)

    def rows(self) -> list[SourceRow]:
        now = time.monotonic()
        rows = []
        with self._lock:
            for i, source in enumerate(self._sources):
                box = source.mailbox
                arrived, processed = box.arrived, self._processed[i]
                samples = self._samples[i]
                if not samples or now - samples[-1][0] >= defaults.STREAM_TABLE_REFRESH_S / 2:
                    samples.append((now, arrived, processed))
                while len(samples) > 2 and now - samples[1][0] >= defaults.STREAM_RATE_WINDOW_S:
                    samples.popleft()
                t0, a0, p0 = samples[0] if len(samples) > 1 else (self.started, 0, 0)
                span = now - t0
                in_fps = (arrived - a0) / span if span >= 0.5 else None
                out_fps = (processed - p0) / span if span >= 0.5 else None
                lat = np.asarray(self._latency[i], dtype=np.float64)
                p50, p99 = (float(np.percentile(lat, 50)), float(np.percentile(lat, 99))) if lat.size else (None, None)
                rows.append(SourceRow(source.spec.name, source.state, arrived, processed, box.dropped,
                                      source.reconnects, in_fps, out_fps, p50, p99, source.last_error,
                                      self._reused[i], self._missed[i]))
        return rows
