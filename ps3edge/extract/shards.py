"""The shards of an extract: which items each holds, writing one atomically, reading one back.

Format: safetensors, one file per shard (`shard-00000.safetensors`, ...). The choice:
- the items are tensors of fixed dtype and shape (features (tokens, C), prob (G0, G0), one
  uint8 selection map per high-res scale), which safetensors stores as they are, fp16
  included, while Parquet would flatten each into a list column to be reshaped by the reader;
- training code reads a shard without ps3edge, in numpy, torch, JAX or via Hugging Face's
  loaders (`safetensors.safe_open(path, "np")`), memory-mapped, one tensor at a time;
- it is already what `ps3edge run` writes (the same tensor names) and a core dependency, so
  the local engine needs no extra package.

In a shard, item k's tensors are `k/features`, `k/prob` and `k/selection_map_<scale>` (k: the
item's place in the job's listing, sources.py). The header's metadata entry `ps3edge-extract`
holds, as JSON, the shard's number, the run digest (record.py) and a record per item (`items`:
index, source, frame, timestamp, image size) and per failed item (`errors`: index, source,
frame, timestamp, reason). Equal shards are equal files, whichever engine wrote them. A shard file
exists only when complete: it is written to a temporary name and renamed (artifact/io.py),
so a rerun can trust every shard it finds and redo the others.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from ..artifact.io import write_bytes_atomic

FORMAT = "ps3edge-extract/1"
SHARD_DIGITS = 5
METADATA_KEY = "ps3edge-extract"
DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass(frozen=True)
class Layout:
    """Item i belongs to shard i // shard_size; shard s holds items [s*S, min((s+1)*S, n))."""
    items: int
    shard_size: int

    @property
    def shards(self) -> int:
        return -(-self.items // self.shard_size)

    def span(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.items))

    def name(self, shard: int) -> str:
        digits = max(SHARD_DIGITS, len(str(max(self.shards - 1, 0))))
        return f"shard-{shard:0{digits}d}.safetensors"


@dataclass
class Outcome:
    """What became of one item: its tensors and record, or the reason it failed."""
    index: int
    record: dict                          # source, frame, timestamp (+ width, height when extracted)
    tensors: dict = field(default_factory=dict)
    error: Optional[str] = None


def item_tensors(result, dtype: str) -> dict:
    """One look-close result as a shard item's tensors: features (tokens, C) in `dtype`, prob
    (G0, G0) float32, selection_map_<scale> (g, g) uint8 (the names `ps3edge run` writes)."""
    tensors = {"features": np.ascontiguousarray(result.features[0], dtype=DTYPES[dtype]),
               "prob": np.ascontiguousarray(result.prob, dtype=np.float32)}
    for scale, m in zip(result.scales, result.plan.selection_maps):
        tensors[f"selection_map_{scale}"] = np.ascontiguousarray(m, dtype=np.uint8)
    return tensors


def shard_bytes(shard: int, outcomes: list[Outcome], run_digest: str) -> bytes:
    """A shard file's content: the extracted items' tensors and the records of all its items."""
    tensors, items, errors = {}, [], []
    for o in sorted(outcomes, key=lambda o: o.index):
        if o.error is not None:
            errors.append({"index": o.index, **o.record, "reason": o.error})
            continue
        items.append({"index": o.index, **o.record})
        tensors.update({f"{o.index}/{name}": array for name, array in o.tensors.items()})
    # one metadata entry: safetensors writes a header's entries in no fixed order, and equal
    # shards should be equal files
    header = {"format": FORMAT, "shard": shard, "run": run_digest, "items": items, "errors": errors}
    return save(tensors, metadata={METADATA_KEY: json.dumps(header, sort_keys=True)})


def write_shard(directory: Path, layout: Layout, shard: int, outcomes: list[Outcome], run_digest: str) -> Path:
    path = Path(directory) / layout.name(shard)
    write_bytes_atomic(path, shard_bytes(shard, outcomes, run_digest))
    return path


def read_header(path: Path) -> Optional[dict]:
    """A shard's header (format, shard, run, items, errors), or None when the file is not a whole
    shard."""
    try:
        with safe_open(str(path), "np") as f:
            header = json.loads((f.metadata() or {})[METADATA_KEY])
    except Exception:              # a missing or torn file, another file: safetensors' errors, KeyError, ValueError
        return None
    return header if isinstance(header, dict) and header.get("format") == FORMAT else None


def read_items(path: Path) -> dict[int, dict[str, np.ndarray]]:
    """Every item of a shard: index -> name -> array (for tests and small shards)."""
    out: dict[int, dict[str, np.ndarray]] = {}
    with safe_open(str(path), "np") as f:
        for key in f.keys():
            index, name = key.split("/", 1)
            out.setdefault(int(index), {})[name] = f.get_tensor(key)
    return out
