"""The local engine: decoding and preprocessing in worker threads, feeding batched
`Pipeline.run_batch` calls in this process, so the CPU decode of the next chunks overlaps the
inference of this one (PIL, PyAV and the runtimes release the GIL while they work).

At most `workers + 1` chunks are decoded ahead, so memory holds a few batches of pixels and
one shard's outputs, whatever the number of items.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .shards import Layout, Outcome
from .sources import Item
from .work import Work, chunks, infer, prepare

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


class LocalEngine:
    """The artifact loaded in this process (made while the job is checked: a backend, precision,
    layer or prompt it cannot take is refused before anything is written), then `run`."""

    def __init__(self, work: Work, workers: int = DEFAULT_WORKERS):
        self.work, self.workers = work, workers
        self.pipeline = work.open()

    def run(self, items: list[Item], layout: Layout, shards: list[int],
            on_outcomes: Callable[[int, list[Outcome]], None]) -> None:
        """Extract the items of `shards`; `on_outcomes(shard, outcomes)` receives each chunk's
        outcomes in order (the job writes a shard once all of its outcomes are in)."""
        work, pipeline, workers = self.work, self.pipeline, self.workers
        todo = chunks(layout, shards, work.batch(pipeline))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ps3edge-decode") as pool:
            ahead: deque = deque()

            def submit_next() -> None:
                for shard, span in todo:
                    chunk = [items[i] for i in span]
                    ahead.append((shard, span, chunk, pool.submit(prepare, pipeline, work, chunk)))
                    return

            try:
                for _ in range(workers + 1):
                    submit_next()
                while ahead:
                    shard, span, chunk, future = ahead.popleft()
                    prepared = future.result()
                    submit_next()
                    on_outcomes(shard, infer(pipeline, work, span, chunk, prepared))
            finally:
                for *_, future in ahead:
                    future.cancel()

    def close(self) -> None:
        self.pipeline.close()
