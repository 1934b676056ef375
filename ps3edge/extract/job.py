"""One extract job, in two steps: `prepare_extract` resolves and checks everything (arguments,
the output directory, the artifact, the listing, a previous run's record, the engine: the
pipeline loaded, or Ray joined) and writes nothing, so a refused job leaves --out as it found
it (absent stays absent, a resumed directory unchanged); `Job.run` then takes the output
directory's writer lock, skips the shards a previous run finished, runs the engine on the rest
(writing each shard once all its items are in, --out made with the first) and writes the index
and errors files.

Rerunning the same job after an interruption (Ctrl-C, kill -9, a full disk) continues it: the
lock removes what the dead writer left half-written, and only whole shards are kept (shards.py).
A shard's failed items stay failed on a rerun; they are listed in the errors file.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..artifact.lock import writer_lock
from ..artifact.manifest import load_manifest
from ..errors import Ps3EdgeError
from .record import ERRORS_NAME, check_run, done_shards, run_digest, run_record, write_index_and_errors, write_run
from .shards import DTYPES, Layout, Outcome, read_header, write_shard
from .sources import Failure, Item, list_items
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
    failed: int                           # items and unlisted videos (errors.jsonl, less the videos cut short)
    shards: int
    resumed_shards: int                   # shards a previous run had finished
    seconds: float                        # this run's time on the shards it wrote
    ran: int                              # items this run processed
    errors_file: Path
    cut_short: tuple = field(default=())  # Failures of the videos cut short (their frames read are items)


class _Progress:
    """No progress display (the default)."""

    def start(self, total: int, completed: int) -> None:
        pass

    def advance(self, count: int) -> None:
        pass


def check_arguments(work: Work, fps: Optional[float], shard_size: int, out: Path) -> None:
    """The refusals that need nothing read."""
    if work.dtype not in DTYPES:
        raise Ps3EdgeError(f"--dtype takes {' or '.join(DTYPES)}, got '{work.dtype}'")
    if fps is not None and not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise Ps3EdgeError(f"--fps must be above 0 and finite (the frames per second to sample), got {fps!r}")
    if shard_size < 1:
        raise Ps3EdgeError(f"--shard-size must be at least 1, got {shard_size}")
    if out.exists() and not out.is_dir():
        raise Ps3EdgeError(f"--out {out} is a file; extract writes a directory of shards")


def prepare_extract(*, artifact_dir: Path, inputs, out: Path, work: Work, fps: Optional[float], shard_size: int,
                    prompt_path: Optional[Path] = None, engine: Engine = Engine()) -> "Job":
    """Every check of an extract job, nothing written: the Job to run (and close), or the
    one-line refusal. Cheap checks come first, the engine (a model load, a Ray start) last."""
    out = Path(out)
    check_arguments(work, fps, shard_size, out)
    if engine.ray is not None:
        from .ray_engine import import_ray
        import_ray()                                  # refuse before any work when Ray is missing
    manifest = load_manifest(artifact_dir, verify=False)   # the engines' pipelines verify the files
    work.check(manifest)
    items, failures = list_items(inputs, fps)
    record = run_record(artifact_dir=artifact_dir, manifest=manifest, backend=work.backend, precision=work.precision,
                        settings=work.settings, layer=work.layer, prompt=work.prompt, prompt_path=prompt_path,
                        dtype=work.dtype, exif_transpose=work.exif_transpose, fps=fps, shard_size=shard_size,
                        inputs=inputs, items=items, failures=failures)
    check_run(out, record)                            # again under the lock, where it counts
    if engine.ray is None:
        from .local import DEFAULT_WORKERS, LocalEngine
        runner = LocalEngine(work, workers=engine.workers or DEFAULT_WORKERS)
    else:
        from .ray_engine import RayEngine
        runner = RayEngine(work, engine.ray, engine.actors, manifest)
    return Job(out=out, items=items, failures=failures, layout=Layout(len(items), shard_size), record=record,
               runner=runner)


@dataclass
class Job:
    """A checked job (prepare_extract) holding its ready engine; `run` writes, `close` (or `with`)
    frees the engine."""
    out: Path
    items: list[Item]
    failures: list[Failure]               # videos not listed, and videos cut short
    layout: Layout
    record: dict
    runner: object                        # local.LocalEngine or ray_engine.RayEngine

    def run(self, progress=None) -> Summary:
        """Run (or continue) the job; see the module docstring."""
        progress = progress or _Progress()
        out, layout, items = self.out, self.layout, self.items
        with writer_lock(out, "extracting"):
            check_run(out, self.record)
            digest = run_digest(self.record)
            headers = done_shards(out, layout, digest) if out.is_dir() else {}
            pending = [s for s in range(layout.shards) if s not in headers]
            ran = sum(len(layout.span(s)) for s in pending)
            progress.start(len(items), len(items) - ran)
            start = time.perf_counter()
            if pending:
                write = _ShardWriter(out, layout, self.record, headers, progress)
                self.runner.run(items, layout, pending, write)
                missing = [s for s in pending if s not in headers]
                if missing:
                    raise Ps3EdgeError(f"the engine returned no results for shard {layout.name(missing[0])}; "
                                       f"run the same command again to continue")
            seconds = time.perf_counter() - start
            write_run(out, self.record)
            extracted, failed = write_index_and_errors(out, layout, headers, self.failures)
        cut = tuple(f for f in self.failures if f.cut_short)
        return Summary(inputs=len(items) + len(self.failures) - len(cut), extracted=extracted, failed=failed,
                       shards=layout.shards, resumed_shards=layout.shards - len(pending), seconds=seconds, ran=ran,
                       errors_file=out / ERRORS_NAME, cut_short=cut)

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_extract(*, artifact_dir: Path, inputs, out: Path, work: Work, fps: Optional[float], shard_size: int,
                prompt_path: Optional[Path] = None, engine: Engine = Engine(), progress=None) -> Summary:
    """Check, then run (or continue) an extract job; see the module docstring."""
    with prepare_extract(artifact_dir=artifact_dir, inputs=inputs, out=out, work=work, fps=fps,
                         shard_size=shard_size, prompt_path=prompt_path, engine=engine) as job:
        return job.run(progress)


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
