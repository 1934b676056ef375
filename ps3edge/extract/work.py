"""The work both engines do on a chunk of items: decode and preprocess, then one batched
`Pipeline.run_batch`, and each item's outcome (its shard tensors, or why it failed).

A chunk is at most one batch of consecutive items of one shard (`chunks`); the local engine
and every Ray actor cut the same chunks and run the same calls, so both engines write equal
shards. When a batch fails as a whole (a model that gives non-finite values for one image, say)
its items are run one by one, so only the items that fail are listed as failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..errors import Ps3EdgeError
from ..runtime.lookclose import Pipeline, checked_prompt, geometry_of, layer_index
from ..runtime.runners.registry import get_backend
from ..runtime.planning import LookCloseSettings, resolve_steps
from .shards import Layout, Outcome, item_tensors
from .sources import Failure, Item, decode, display, source_fields


@dataclass(frozen=True)
class Work:
    """What each item goes through: the artifact on a backend, and the look-close call."""
    artifact_dir: Path
    backend: str
    precision: str
    device: Optional[str]
    settings: LookCloseSettings
    prompt: Optional[np.ndarray]
    layer: int
    dtype: str
    exif_transpose: bool
    batch_size: Optional[int]             # None: the artifact's bound (Pipeline.max_batch)

    def check(self, manifest) -> None:
        """Refuse, from the artifact's manifest alone (nothing loaded), settings this model cannot
        take, a batch over its bound, a backend ps3edge does not have, a layer the artifact did not
        export and a prompt of the wrong width: the checks a job makes before it starts Ray (whether
        the backend runs and the precision exists, the workers' machines decide)."""
        get_backend(self.backend)
        layer_index(manifest, self.layer)
        if self.prompt is not None:
            checked_prompt(manifest, self.settings, self.prompt)
        resolve_steps(self.settings, geometry_of(manifest))
        self._check_batch(manifest.geometry.max_batch)

    def open(self) -> Pipeline:
        """The pipeline, after refusing what would fail every item (a layer that was not exported,
        a prompt of the wrong width, settings this model cannot take, a batch over its bound)."""
        pipeline = Pipeline(self.artifact_dir, self.backend, precision=self.precision, device=self.device)
        try:
            pipeline.layer_index(self.layer)
            pipeline.prompt(self.settings, self.prompt)
            resolve_steps(self.settings, pipeline.geometry)
            self._check_batch(pipeline.max_batch)
        except BaseException:
            pipeline.close()
            raise
        return pipeline

    def _check_batch(self, max_batch: int) -> None:
        if self.batch_size is not None and self.batch_size > max_batch:
            raise Ps3EdgeError(f"--batch-size {self.batch_size} is over this artifact's bound of {max_batch} "
                               f"images a batch; lower it or re-export with `ps3edge export --max-batch {self.batch_size}`")

    def batch(self, pipeline: Pipeline) -> int:
        return self.batch_size or pipeline.max_batch


def chunks(layout: Layout, shards, batch: int) -> Iterator[tuple[int, range]]:
    """(shard, item range) of each chunk of the given shards, in order."""
    for shard in shards:
        span = layout.span(shard)
        for start in range(span.start, span.stop, batch):
            yield shard, range(start, min(start + batch, span.stop))


def _record(item: Item) -> dict:
    return {**source_fields(item.source), "frame": item.frame, "timestamp": item.timestamp}


def prepare(pipeline: Pipeline, work: Work, items: list[Item]) -> list:
    """Each item's run_batch input with its image size, or its Failure: decoded, and on the CPU
    path preprocessed too (the part of the work that overlaps inference)."""
    prepared = []
    for item, image in zip(items, decode(items, work.exif_transpose)):
        if isinstance(image, Failure):
            prepared.append(image)
            continue
        try:
            pixels = pipeline.pixels(image) if pipeline.preprocess_on == "cpu" else image
        except Ps3EdgeError as e:
            prepared.append(Failure(item.source, str(e), item.frame))
            continue
        prepared.append((pixels, image.size))
    return prepared


def infer(pipeline: Pipeline, work: Work, indices: range, items: list[Item], prepared: list) -> list[Outcome]:
    """One run_batch over a chunk's prepared items; every item's Outcome, in order."""
    outcomes = [Outcome(i, _record(item)) for i, item in zip(indices, items)]
    ready = [k for k, p in enumerate(prepared) if not isinstance(p, Failure)]
    for k, p in enumerate(prepared):
        if isinstance(p, Failure):
            outcomes[k].error = display(p.reason)
    if not ready:
        return outcomes
    try:
        results = pipeline.run_batch([prepared[k][0] for k in ready], work.settings, work.prompt, work.layer)
    except Ps3EdgeError:
        results = None
    for n, k in enumerate(ready):
        try:
            result = results[n] if results is not None else \
                pipeline.run_batch([prepared[k][0]], work.settings, work.prompt, work.layer)[0]
        except Ps3EdgeError as e:
            outcomes[k].error = display(str(e))
            continue
        width, height = prepared[k][1]
        outcomes[k].record.update(width=width, height=height)
        outcomes[k].tensors = item_tensors(result, work.dtype)
    return outcomes
