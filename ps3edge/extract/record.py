"""The files beside the shards: the run record (`run.json`), the index and the errors file.

`run.json` is written with the first shard and says what the shards are: the artifact (its
model and a sha256 over the manifest's file digests), the backend and precision, the look-close
settings, layer, prompt embedding (sha256), feature dtype, EXIF handling, frame rate, shard size,
the listing (item count and a sha256 over it) and the ps3edge version. Those fields are the
run's identity: a rerun into the same directory continues only when its identity is equal, and
is refused in one line naming the first field that differs. (Batch size, engine and actor
count are recorded by no one: they change no value.)

`index.jsonl` (one line per extracted item: index, shard, source, frame, timestamp, width,
height) and `errors.jsonl` (one line per input that could not be read: index, source, frame,
reason; a video cut short adds frames_read and frames_expected) are written at the end of each
run from the shards' own headers and the listing, so they are always whole. A source whose file
name is not UTF-8 has "source" with \\xNN escapes and "source_bytes", its bytes in base64
(sources.source_fields), so both files are valid UTF-8 JSON that loses no name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..version import __version__
from ..artifact.io import write_bytes_atomic, write_json_atomic
from ..errors import Ps3EdgeError
from .shards import FORMAT, Layout, read_header
from .sources import Failure, Item, display, source_fields

RUN_NAME = "run.json"
INDEX_NAME = "index.jsonl"
ERRORS_NAME = "errors.jsonl"

# the fields that must be equal for a rerun to continue a directory's shards, in the order a
# refusal looks for the first difference
IDENTITY = ("format", "ps3edge", "artifact_sha256", "backend", "precision", "settings", "layer",
            "prompt_embedding_sha256", "dtype", "exif_transpose", "fps", "shard_size", "items", "items_sha256")


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _plain(value):
    """JSON's view of a value (tuples become lists), so a record compares equal to its reread self."""
    return json.loads(json.dumps(value))


def artifact_digest(manifest) -> str:
    """sha256 over the artifact's file digests as its manifest lists them (and the weights')."""
    return _digest({"files": dict(manifest.files), "weights_sha256": manifest.weights_sha256})


def items_digest(items: list[Item], failures: list[Failure]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update((json.dumps(item.to_dict(), sort_keys=True) + "\n").encode())
    for f in failures:
        if not f.cut_short:                   # a video cut short is in the items already
            h.update((json.dumps(["unlisted", f.source], sort_keys=True) + "\n").encode())
    return h.hexdigest()


def run_record(*, artifact_dir, manifest, backend: str, precision: str, settings, layer: int, prompt,
               prompt_path, dtype: str, exif_transpose: bool, fps: Optional[float], shard_size: int,
               inputs, items: list[Item], failures: list[Failure]) -> dict:
    """The run record of a job (see the module docstring)."""
    prompt_sha = None if prompt is None else hashlib.sha256(np.ascontiguousarray(prompt, np.float32).tobytes()).hexdigest()
    return _plain({
        "format": FORMAT, "ps3edge": __version__,
        "artifact": str(artifact_dir), "model": manifest.config.name,
        "artifact_sha256": artifact_digest(manifest), "artifact_files": dict(manifest.files),
        "backend": backend, "precision": precision,
        "settings": dataclasses.asdict(settings), "layer": layer,
        "prompt_embedding": None if prompt_path is None else str(prompt_path),
        "prompt_embedding_sha256": prompt_sha,
        "dtype": dtype, "exif_transpose": exif_transpose, "fps": fps, "shard_size": shard_size,
        "inputs": [display(str(i)) for i in inputs], "items": len(items), "items_sha256": items_digest(items, failures),
        "shards": Layout(len(items), shard_size).shards,
    })


def run_digest(record: dict) -> str:
    """The digest every shard of the run carries: of the identity fields."""
    return _digest({k: record[k] for k in IDENTITY})


def _field_text(name: str, value) -> str:
    if name in ("artifact_sha256", "items_sha256", "prompt_embedding_sha256") and isinstance(value, str):
        return value[:12]
    return json.dumps(value, sort_keys=True)


def check_run(out: Path, record: dict) -> None:
    """Refuse to write into `out` unless it is new, empty, or holds a run of the same identity
    (the caller holds the lock; a new run's record is written with its first shard)."""
    path = out / RUN_NAME
    if not path.is_file():
        others = [p.name for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
        if others:
            raise Ps3EdgeError(f"--out {out} is not empty and holds no extract ({RUN_NAME}); "
                               f"choose a new or empty directory")
        return
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Ps3EdgeError(f"{path} cannot be read ({e}); choose another --out") from None
    for name in IDENTITY:
        if previous.get(name) != record[name]:
            if name == "settings" and isinstance(previous.get(name), dict):
                key = next(k for k in record[name] if previous[name].get(k) != record[name][k])
                raise Ps3EdgeError(f"{out} holds an extract made with another look-close {key} "
                                   f"({_field_text(key, previous[name].get(key))}, here {_field_text(key, record[name][key])}); "
                                   f"rerun with the same settings to continue it, or choose another --out")
            what = {"items": "number of items", "items_sha256": "inputs", "artifact_sha256": "artifact",
                    "prompt_embedding_sha256": "prompt embedding", "ps3edge": "ps3edge version"}.get(name, name)
            raise Ps3EdgeError(f"{out} holds an extract made with another {what} "
                               f"({_field_text(name, previous.get(name))}, here {_field_text(name, record[name])}); "
                               f"rerun with the same settings to continue it, or choose another --out")


def write_run(out: Path, record: dict) -> None:
    """The run record, once: before the run's first shard, in an output directory made then (so
    a job that stops before its first shard leaves --out as it found it)."""
    if not (out / RUN_NAME).is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RUN_NAME, record)


def done_shards(out: Path, layout: Layout, digest: str) -> dict[int, dict]:
    """shard -> header of the shards already written whole by this run."""
    done = {}
    for shard in range(layout.shards):
        header = read_header(out / layout.name(shard))
        if header is not None and header["run"] == digest and header["shard"] == shard:
            done[shard] = header
    return done


def error_entry(f: Failure) -> dict:
    """A listing failure's errors.jsonl line (a video unlisted, or cut short)."""
    entry = {"index": None, **source_fields(f.source), "frame": f.frame, "reason": display(f.reason)}
    if f.cut_short:
        entry.update(frames_read=f.frames_read, frames_expected=f.frames_expected)
    return entry


def write_index_and_errors(out: Path, layout: Layout, headers: dict[int, dict], failures: list[Failure]) -> tuple[int, int]:
    """index.jsonl and errors.jsonl from the shards' headers (and the listing's failures);
    returns (items extracted, inputs failed: items and unlisted videos, not the videos cut short)."""
    index_lines, error_lines = [], []
    for f in failures:
        error_lines.append(json.dumps(error_entry(f)))
    for shard in range(layout.shards):
        header = headers[shard]
        for record in header["items"]:
            index_lines.append(json.dumps({**record, "shard": layout.name(shard)}))
        for record in header["errors"]:
            names = ("index", "source", "source_bytes", "frame", "reason") if "source_bytes" in record else \
                ("index", "source", "frame", "reason")
            error_lines.append(json.dumps({k: record.get(k) for k in names}))
    write_bytes_atomic(out / INDEX_NAME, "".join(line + "\n" for line in index_lines).encode())
    write_bytes_atomic(out / ERRORS_NAME, "".join(line + "\n" for line in error_lines).encode())
    return len(index_lines), len(error_lines) - sum(f.cut_short for f in failures)
