"""One extract job, start to end: list the inputs, take the output directory's writer lock,
check or write the run record, skip the shards a previous run finished, run the engine on the
rest (writing each shard once all its items are in), then write the index and errors files.

Rerunning the same job after an interruption (Ctrl-C, kill -9, a full disk) continues it: the
lock removes what the dead writer left half-written, and only whole shards are kept (shards.py).
A shard's failed items stay failed on a rerun; they are listed in the errors file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..artifact.lock import writer_lock
from ..artifact.manifest import load_manifest
from ..errors import Ps3EdgeError
from .record import ERRORS_NAME, check_run, done_shards, run_digest, run_record, write_index_and_errors, write_run
from .shards import DTYPES, Layout, Outcome, read_header, write_shard
from .sources import list_items
from .work import Work


@dataclass(frozen=True)
class Engine:
    """Where the items run: this process (ray None), or Ray at an address (auto, local, host:port)."""
    ray: Optional[str] = None
    actors: Optional[int] = None
    workers: Optional[int] = None         # the local engine's decode threads (None: its default)


@dataclass(frozen=True)
class Summary:
    inputs: int                           # items listed plus videos that could not be listed
    extracted: int
    failed: int
    shards: int
    resumed_shards: int                   # shards a previous run had finished
    seconds: float                        # this run's time on the shards it wrote
    ran: int                              # items this run processed
    errors_file: Path


class _Progress:
    """No progress display (the default)."""

    def start(self, total: int, completed: int) -> None:
        pass

    def advance(self, count: int) -> None:
        pass


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise Ps3EdgeError(f"--out {out} is a file; extract writes a directory of shards")


def run_extract(*, artifact_dir: Path, inputs, out: Path, work: Work, fps: Optional[float], shard_size: int,
                prompt_path: Optional[Path] = None, engine: Engine = Engine(), progress=None) -> Summary:
    """Run (or continue) an extract job; see the module docstring."""
    progress = progress or _Progress()
    if work.dtype not in DTYPES:
        raise Ps3EdgeError(f"--dtype takes {' or '.join(DTYPES)}, got '{work.dtype}'")
    if fps is not None and not fps > 0:
        raise Ps3EdgeError(f"--fps must be above 0, got {fps:g}")
    if shard_size < 1:
        raise Ps3EdgeError(f"--shard-size must be at least 1, got {shard_size}")
    if engine.ray is not None:
        from .ray_engine import import_ray
        import_ray()                                  # refuse before any work when Ray is missing
    _check_out(out)
    manifest = load_manifest(artifact_dir, verify=False)   # the engines' pipelines verify the files
    items, failures = list_items(inputs, fps)
    record = run_record(artifact_dir=artifact_dir, manifest=manifest, backend=work.backend, precision=work.precision,
                        settings=work.settings, layer=work.layer, prompt=work.prompt, prompt_path=prompt_path,
                        dtype=work.dtype, exif_transpose=work.exif_transpose, fps=fps, shard_size=shard_size,
                        inputs=inputs, items=items, failures=failures)
    layout = Layout(len(items), shard_size)
    with writer_lock(out, "extracting"):
        out.mkdir(parents=True, exist_ok=True)
        check_run(out, record)
        digest = run_digest(record)
        headers = done_shards(out, layout, digest)
        pending = [s for s in range(layout.shards) if s not in headers]
        ran = sum(len(layout.span(s)) for s in pending)
        progress.start(len(items), len(items) - ran)
        start = time.perf_counter()
        if pending:
            write = _ShardWriter(out, layout, record, headers, progress)
            _run_engine(engine, work, items, layout, pending, write, manifest)
            missing = [s for s in pending if s not in headers]
            if missing:
                raise Ps3EdgeError(f"the engine returned no results for shard {layout.name(missing[0])}; "
                                   f"run the same command again to continue")
        seconds = time.perf_counter() - start
        write_run(out, record)
        extracted, failed = write_index_and_errors(out, layout, headers, failures)
    return Summary(inputs=len(items) + len(failures), extracted=extracted, failed=failed, shards=layout.shards,
                   resumed_shards=layout.shards - len(pending), seconds=seconds, ran=ran,
                   errors_file=out / ERRORS_NAME)


def _run_engine(engine: Engine, work: Work, items, layout: Layout, pending: list[int],
                write: Callable[[int, list[Outcome]], None], manifest) -> None:
    if engine.ray is None:
        from .local import DEFAULT_WORKERS, run_local
        run_local(work, items, layout, pending, write, workers=engine.workers or DEFAULT_WORKERS)
        return
    from .ray_engine import run_ray
    # the chunk size is cut here, where no pipeline is loaded: the bound Pipeline.max_batch reads
    max_batch = manifest.geometry.max_batch
    if work.batch_size is not None and work.batch_size > max_batch:
        raise Ps3EdgeError(f"--batch-size {work.batch_size} is over this artifact's bound of {max_batch} "
                           f"images a batch; lower it or re-export with `ps3edge export --max-batch {work.batch_size}`")
    run_ray(work, items, layout, pending, write, engine.ray, engine.actors, max_batch)


class _ShardWriter:
    """Collects outcomes by shard and writes each shard as soon as all of its items are in."""

    def __init__(self, out: Path, layout: Layout, record: dict, headers: dict, progress):
        self.out, self.layout, self.record, self.headers, self.progress = out, layout, record, headers, progress
        self.digest = run_digest(record)
        self.buffers: dict[int, dict[int, Outcome]] = {}

    def __call__(self, shard: int, outcomes: list[Outcome]) -> None:
        buffer = self.buffers.setdefault(shard, {})
        for o in outcomes:
            buffer[o.index] = o
        if len(buffer) == len(self.layout.span(shard)):
            write_run(self.out, self.record)
            path = write_shard(self.out, self.layout, shard, list(buffer.values()), self.digest)
            self.headers[shard] = read_header(path)
            del self.buffers[shard]
        self.progress.advance(len(outcomes))
