"""The Ray Data engine (`--ray auto|local|ADDRESS`): the same chunks as the local engine, as a
Ray Dataset, through `map_batches` on a pool of actors that each load the artifact once; the
outcomes come back to this process, which writes the shards, index and errors files exactly as
the local engine does (so resume works across engines).

Pool sizing: an actor holds its share of the cluster's CPUs and, where there are GPUs, one GPU
(or its share of them); a part of one CPU is always left free, because Ray Data's own tasks
need it too: a pool that takes every CPU (two one-CPU actors on two CPUs) starves them and the
job never finishes. Default size: one actor per GPU, else one per four CPUs (an onnxruntime
session already runs on several cores).

On a cluster every node needs ps3edge installed and the artifact and inputs at the same paths;
only this process writes the output directory. The job's checks run here before Ray starts
(settings, batch bound); what needs the artifact loaded (backend, precision, layer, prompt) is
refused by the first actor, in one line, before the first shard, so --out is left as it was.

Quiet by design: Ray Data's progress bars and execution banners are off (the command shows its
own bar, of the job's items and rate), Ray's loggers print errors only, Ray Data's console only
critical records while the job runs, and the actors' output is not forwarded; a failure comes
back as the exception and ends the job with one line. Actors are not restarted
(max_restarts=0): a job whose actor dies stops with that line and the same command continues
it from its finished shards. (Ray Data passes its own object-store references to every pool
actor, and Ray logs an error-level line for any such actor that may be restarted, on every run.)
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import warnings
from typing import Callable, Optional

import numpy as np

from ..errors import Ps3EdgeError
from .shards import Layout, Outcome
from .sources import Item
from .work import Work, chunks, infer, prepare

RAY_MISSING = "--ray needs Ray Data: pip install 'ps3edge[ray]'"
CPUS_PER_ACTOR_WITHOUT_GPU = 4
MAX_BLOCKS = 4096


def import_ray():
    """The ray module with Ray Data, or the one-line refusal."""
    # Ray Data's INFO lines would bury the progress bar: the environment reaches the processes
    # Ray starts, the logger covers an imported Ray Data. (RAY_BACKEND_LOG_LEVEL is left alone:
    # setting it makes Ray's core print a line saying so.)
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise Ps3EdgeError(RAY_MISSING) from None
    logging.getLogger("ray.data").setLevel(os.environ["RAY_DATA_LOG_LEVEL"])
    return ray


def pool_size(cpus: float, gpus: float, actors: Optional[int]) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) for a cluster of `cpus` and `gpus`."""
    count = actors or (int(gpus) if gpus >= 1 else max(1, int(cpus) // CPUS_PER_ACTOR_WITHOUT_GPU))
    spare = min(1.0, cpus / 4)                       # what Ray Data's own tasks keep
    num_cpus = int((cpus - spare) / count * 100) / 100
    if num_cpus < 0.01:
        raise Ps3EdgeError(f"--actors {count} is more than the Ray cluster's {cpus:g} CPUs can hold; use fewer")
    num_gpus = min(1.0, gpus / count) if gpus > 0 else 0.0
    return count, num_cpus, num_gpus


def _connect(ray, address: str) -> bool:
    """Join (or, for 'local', start) a Ray instance; True when this call started it."""
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False}
    try:
        if address == "local":
            ray.init(num_cpus=os.cpu_count(), **quiet)
        else:
            ray.init(address=address, **quiet)
    except Exception as e:            # ConnectionError, ValueError, Ray's own: the address is the cause
        raise Ps3EdgeError(f"cannot start or join Ray at '{address}': {' '.join(str(e).split())[:300]}") from None
    return True


@contextlib.contextmanager
def _console_quiet():
    """Ray Data's console handler (its logging config's "console") shows critical records only,
    for the block: a failure's error records and stack frames come back to the job as the
    exception, which ends it in one line; Ray Data's log file keeps them."""
    handlers = [h for h in logging.getLogger("ray.data").handlers if h.name == "console"]
    levels = [h.level for h in handlers]
    for h in handlers:
        h.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for h, level in zip(handlers, levels):
            h.setLevel(level)


def _no_restarts(map_batches) -> dict:
    """map_batches' argument for actors that are not restarted, where this Ray takes one (as a
    remote argument, which Ray marks deprecated while it names no other way)."""
    params = inspect.signature(map_batches).parameters.values()
    takes = any(p.name == "max_restarts" or p.kind is p.VAR_KEYWORD for p in params)
    return {"max_restarts": 0} if takes else {}


class Extractor:
    """A Ray actor's work: the artifact loaded once, then each row (one chunk) decoded, batched
    through run_batch, and returned as one row per item."""

    def __init__(self, work: Work):
        self.work = work
        self.pipeline = work.open()

    def __call__(self, batch: dict) -> dict:
        rows: dict = {"shard": [], "index": [], "record": [], "tensors": [], "error": []}
        for shard, start, stop, encoded in zip(batch["shard"], batch["start"], batch["stop"], batch["items"]):
            items = [Item.from_dict(d) for d in json.loads(encoded)]
            span = range(int(start), int(stop))
            for o in infer(self.pipeline, self.work, span, items, prepare(self.pipeline, self.work, items)):
                rows["shard"].append(int(shard))
                rows["index"].append(o.index)
                rows["record"].append(json.dumps(o.record))
                rows["tensors"].append(_pack(o.tensors))
                rows["error"].append(o.error or "")
        return {"shard": np.array(rows["shard"], np.int64), "index": np.array(rows["index"], np.int64),
                "record": np.array(rows["record"], dtype=object), "tensors": np.array(rows["tensors"], dtype=object),
                "error": np.array(rows["error"], dtype=object)}


def _pack(tensors: dict) -> bytes:
    from safetensors.numpy import save
    return save(tensors) if tensors else b""


def _unpack(data: bytes) -> dict:
    from safetensors.numpy import load
    return load(bytes(data)) if data else {}


def _explain(e: Exception) -> Ps3EdgeError:
    """A failure inside Ray as one line: a Ps3EdgeError an actor raised keeps its message."""
    seen = e
    while seen is not None:
        if isinstance(seen, Ps3EdgeError):
            return Ps3EdgeError(str(seen))
        seen = getattr(seen, "cause", None) or seen.__cause__
    text = " ".join(str(e).split())
    marker = "Ps3EdgeError: "
    if marker in text:
        return Ps3EdgeError(text.split(marker, 1)[1][:300])
    return Ps3EdgeError(f"the Ray job failed ({type(e).__name__}): {text[:300]}; "
                        f"the same command continues it from its finished shards")


class RayEngine:
    """A Ray instance joined (or started) while the job is checked, and its actor pool sized;
    then `run`, and `close` (which stops a Ray this engine started)."""

    def __init__(self, work: Work, address: str, actors: Optional[int], manifest):
        work.check(manifest)                     # refused here, before Ray starts
        self.work, self.ray = work, import_ray()
        self.max_batch = manifest.geometry.max_batch
        self.started = _connect(self.ray, address)
        try:
            resources = self.ray.cluster_resources()
            self.pool = pool_size(float(resources.get("CPU", 1)), float(resources.get("GPU", 0)), actors)
        except BaseException:
            self.close()
            raise

    def run(self, items: list[Item], layout: Layout, shards: list[int],
            on_outcomes: Callable[[int, list[Outcome]], None]) -> None:
        """The Ray engine's run of `shards` (LocalEngine.run's contract)."""
        ray, work = self.ray, self.work
        count, num_cpus, num_gpus = self.pool
        rows = [{"shard": shard, "start": span.start, "stop": span.stop,
                 "items": json.dumps([items[i].to_dict() for i in span])}
                for shard, span in chunks(layout, shards, work.batch_size or self.max_batch)]
        if not rows:
            return
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True        # chunks come back in order: one shard in memory
        context.enable_progress_bars = False                   # the command shows the job's own bar
        context.print_on_execution_start = False
        # about a chunk a block, so the actors share the work from the first chunk on
        dataset = ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            dataset = dataset.map_batches(
                Extractor, fn_constructor_args=(work,), batch_size=1, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=count), num_cpus=num_cpus,
                **({"num_gpus": num_gpus} if num_gpus else {}), **_no_restarts(dataset.map_batches))
        try:
            with _console_quiet():
                for row in dataset.iter_rows():
                    outcome = Outcome(int(row["index"]), json.loads(row["record"]), _unpack(row["tensors"]),
                                      row["error"] or None)
                    on_outcomes(int(row["shard"]), [outcome])
        except Ps3EdgeError:
            raise
        except Exception as e:
            raise _explain(e) from None

    def close(self) -> None:
        if self.started:
            self.started = False
            self.ray.shutdown()
