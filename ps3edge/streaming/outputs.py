"""Where a stream's records go: a JSON line each (`--jsonl`, flushed per record), and rolling
feature shards per source (`--out`) in `extract`'s shard format. (Rerun logging, `--rerun`, is
rerun_sink.py's; its checks run with these, before any source is opened.)

`--out DIR` holds `stream.json` (what ran: artifact digest, backend, precision, settings, layer,
sources, shard size, ps3edge version; written at the start) and a folder per source,
`DIR/<name>/shard-00000.safetensors`, ... Each shard is extract's (extract/shards.py): item k is
the source's frame k (`k/features`, `k/prob`, `k/selection_map_<scale>`), its header lists the
items' records (source, frame, timestamp, width, height, arrival, latency_ms). A shard holds at most
`shard_size` frames and is written whole, atomically, when full; on stop the partial one is
written, so every shard file found is complete and readable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Optional, TextIO

from ..version import __version__
from ..artifact.io import write_json_atomic
from ..errors import Ps3EdgeError
from ..extract.record import artifact_digest
from ..extract.shards import FORMAT, Layout, Outcome, item_tensors, write_shard
from ..extract.sources import display, source_fields
from .record import FrameRecord
from .rerun_sink import check_rerun

STREAM_RECORD = "stream.json"
DTYPE = "fp32"


def check_out_dir(out: Path) -> None:
    """--out: a new or empty directory (shards of two runs are never mixed)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise Ps3EdgeError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise Ps3EdgeError(f"--out {out} is not empty; choose a new or empty directory")


def check_jsonl_path(path: str) -> None:
    if path == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise Ps3EdgeError(f"--jsonl {p} is a directory; give a file name or '-' for stdout")
    if not p.parent.is_dir():
        raise Ps3EdgeError(f"--jsonl {p}: its folder {p.parent} does not exist")


class JsonlSink:
    """One JSON object per processed frame, a line each, flushed as written ('-': stdout)."""

    def __init__(self, path: str):
        self._own = path != "-"
        try:
            self._file: TextIO = open(path, "w", encoding="utf-8") if self._own else sys.stdout
        except OSError as e:
            raise Ps3EdgeError(f"cannot write --jsonl {path}: {e.strerror or e}") from None

    def write(self, record: FrameRecord) -> None:
        self._file.write(json.dumps(record.to_json()) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._own:
            self._file.close()


def stream_record(*, encoder, settings, layer: int, specs, shard_size: int) -> dict:
    """stream.json: what the shards hold features of."""
    return json.loads(json.dumps({
        "format": FORMAT, "ps3edge": __version__, "kind": "stream",
        "artifact": str(encoder.artifact), "model": encoder.manifest.config.name,
        "artifact_sha256": artifact_digest(encoder.manifest), "backend": encoder.backend,
        "precision": encoder.precision, "settings": dataclasses.asdict(settings), "layer": layer,
        "dtype": DTYPE, "shard_size": shard_size,
        "sources": [{"name": s.name, **source_fields(s.target), "kind": s.kind} for s in specs],
    }))


class ShardSink:
    """Per source, the frames since its last shard; a shard is written when `shard_size` are in."""

    def __init__(self, out: Path, record: dict, specs, shard_size: int):
        self.out, self.shard_size, self.specs = Path(out), shard_size, specs
        self.digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        self.layout = Layout(items=shard_size, shard_size=shard_size)     # names: shard-00000 onwards
        self._pending: list[list[Outcome]] = [[] for _ in specs]
        self._shards = [0] * len(specs)
        self.written: list[Path] = []
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.out / STREAM_RECORD, record)

    def add(self, record: FrameRecord) -> None:
        if record.result is None:
            return
        fields = {**source_fields(self.specs[record.source_index].target), "name": record.source,
                  "frame": record.frame, "timestamp": record.pts, "width": record.width, "height": record.height,
                  "arrival": record.arrival, "latency_ms": round(record.latency_ms, 3)}
        pending = self._pending[record.source_index]
        pending.append(Outcome(record.frame, fields, item_tensors(record.result, DTYPE)))
        if len(pending) >= self.shard_size:
            self._flush(record.source_index)

    def _flush(self, index: int) -> None:
        pending = self._pending[index]
        if not pending:
            return
        shard = self._shards[index]
        folder = self.out / self.specs[index].name
        self.written.append(write_shard(folder, self.layout, shard, pending, self.digest))
        self._pending[index] = []                 # only once the shard is on disk: a stop mid-write rewrites it
        self._shards[index] = shard + 1

    def close(self) -> None:
        """Write every partial shard."""
        for index in range(len(self.specs)):
            self._flush(index)

    def describe(self) -> str:
        return f"{len(self.written)} shards -> {display(str(self.out))}"


def open_sinks(jsonl: Optional[str], out: Optional[Path], rerun: Optional[str] = None,
               rerun_connect: Optional[str] = None) -> None:
    """Refuse unwritable outputs before any source is opened."""
    if jsonl is not None:
        check_jsonl_path(jsonl)
    if out is not None:
        check_out_dir(out)
    check_rerun(rerun, rerun_connect)              # --rerun / --rerun-connect (rerun_sink.py)
