"""One copy of the weights that several stage graphs hold: the PS3 trunk, which both `lowres`
and `highres` run, written once to `trunk.onnx.data`, and both graphs pointing into it.

torch's exporter gives every stage its own copy of each parameter it uses, under the names its
tracer, its constant folding and onnxruntime's rewrites chose: the same block weight can be
`onnx::MatMul_1234` in one graph and `onnx::MatMul_987` in the other. So tensors are matched by
content - data type, dimensions and bytes (their sha256) - never by name, and each graph keeps
its own names; only where the bytes live changes. ONNX lets any number of graphs and tensors
reference one external file (location, offset, length), and every reader of a stage file
(onnx.load, onnxruntime, TensorRT's parser, the lint, calibration) resolves the location beside
the graph, so the layout is plain ONNX. Offsets are 4096-byte aligned, as onnx's own save
writes them, so that a reader can memory-map each tensor.

A stage's own weights (those no other graph holds) stay where they were: in the graph, or in
its own `<stage>.onnx` + `.data` file, rewritten without the shared tensors. Everything is written in
the directory given (the export's staging directory) through temporary names and renames.

The runtime's side is `shared_initializers`: which initializers of a graph point into a file,
so that the onnxruntime runner gives both sessions one memory map of it (runtime/runners/onnxruntime.py).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

from .. import defaults
from ..artifact.io import apply_default_mode, temp_file

MIN_TENSOR_BYTES = 1024       # smaller tensors stay in the graph, as the exporter's own save leaves them


@dataclass(frozen=True)
class ExternalRef:
    """Where an external tensor's bytes are: `location` (a file beside the graph), offset, length."""
    location: str
    offset: int
    length: int


def external_ref(t: TensorProto) -> ExternalRef | None:
    """The external-data reference of `t`, or None for a tensor held in the graph."""
    if t.data_location != TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in t.external_data}
    length = info.get("length")
    return ExternalRef(info["location"], int(info.get("offset", 0)), -1 if length is None else int(length))


def external_files(model: onnx.ModelProto) -> list[str]:
    """The external data files `model`'s initializers point into, in order of first use."""
    seen = {}
    for t in model.graph.initializer:
        ref = external_ref(t)
        if ref is not None:
            seen.setdefault(ref.location, None)
    return list(seen)


def shared_initializers(model: onnx.ModelProto, location: str) -> list[tuple[TensorProto, ExternalRef]]:
    """The initializers of `model` whose bytes are in the file `location`, with where."""
    out = []
    for t in model.graph.initializer:
        ref = external_ref(t)
        if ref is not None and ref.location == location:
            out.append((t, ref))
    return out


class _Reader:
    """The bytes of initializers of the graphs in one directory, their data files opened once."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.files = {}

    def read(self, t: TensorProto) -> bytes | None:
        """The tensor's bytes as raw_data would hold them; None for string tensors."""
        if t.data_type == TensorProto.STRING:
            return None
        ref = external_ref(t)
        if ref is None:
            return t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
        f = self.files.get(ref.location)
        if f is None:
            f = self.files[ref.location] = open(self.directory / ref.location, "rb")
        f.seek(ref.offset)
        return f.read() if ref.length < 0 else f.read(ref.length)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _point(t: TensorProto, location: str, offset: int, length: int) -> None:
    """Make `t` an external tensor at (location, offset, length), its in-graph data dropped."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                  "string_data"):
        t.ClearField(field)
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def _append(out, data: bytes) -> int:
    """Write `data` at the next aligned offset of the open file `out`; returns that offset."""
    pos = out.tell()
    pad = -pos % defaults.EXTERNAL_DATA_ALIGNMENT
    if pad:
        out.write(b"\0" * pad)
    out.write(data)
    return pos + pad


def share_weights(directory, graph_files, min_bytes: int = defaults.SHARED_WEIGHTS_MIN_BYTES,
                  shared_name: str = defaults.SHARED_WEIGHTS_FILE) -> int:
    """Write every initializer that two or more of `graph_files` (ONNX files in `directory`) hold
    once, to `shared_name` there, and point each graph at it; the graphs' other external tensors
    go to `<graph file>.data`. Does nothing (and returns 0) when the shared tensors come to less
    than `min_bytes`. Returns the bytes of the tensors written once."""
    directory = Path(directory)
    models = {g: onnx.load(str(directory / g), load_external_data=False) for g in graph_files}
    reader = _Reader(directory)
    try:
        # (graph, initializer index) -> key; key -> graphs holding it; key -> its first tensor
        keys, holders, first = {}, {}, {}
        for g, model in models.items():
            for i, t in enumerate(model.graph.initializer):
                data = reader.read(t)
                if data is None or len(data) < MIN_TENSOR_BYTES:
                    continue
                key = (t.data_type, tuple(t.dims), len(data), hashlib.sha256(data).hexdigest())
                keys[g, i] = key
                holders.setdefault(key, set()).add(g)
                first.setdefault(key, t)
        shared = [k for k in first if len(holders[k]) > 1]
        total = sum(k[2] for k in shared)
        if not shared or total < min_bytes:
            return 0
        placed = {}
        shared_tmp = temp_file(directory, shared_name)
        with open(shared_tmp, "wb") as out:
            for key in shared:
                placed[key] = _append(out, reader.read(first[key]))
        own_tmp = {g: _rewrite(directory, g, model, keys, placed, reader) for g, model in models.items()}
    finally:
        reader.close()
    apply_default_mode(shared_tmp)
    os.replace(shared_tmp, directory / shared_name)
    for g, model in models.items():
        _publish(directory, g, model, own_tmp[g])
    return total


def _rewrite(directory: Path, graph_file: str, model, keys, placed, reader) -> Path | None:
    """Point `model`'s shared tensors at their place in the shared file and copy its other external
    tensors to a new own data file (a temporary one, returned; None when nothing is left for it).
    The old data files are only read here: nothing in place changes until `_publish`."""
    own_name = graph_file + ".data"
    tmp = temp_file(directory, own_name)
    with open(tmp, "wb") as out:
        for i, t in enumerate(model.graph.initializer):
            key = keys.get((graph_file, i))
            if key in placed:
                _point(t, defaults.SHARED_WEIGHTS_FILE, placed[key], key[2])
            elif external_ref(t) is not None:
                data = reader.read(t)
                _point(t, own_name, _append(out, data), len(data))
        written = out.tell()
    if written:
        return tmp
    tmp.unlink()
    return None


def _publish(directory: Path, graph_file: str, model, own_tmp: Path | None) -> None:
    """Put the rewritten graph and its own data file in place of the old ones."""
    own = directory / (graph_file + ".data")
    graph_tmp = temp_file(directory, graph_file)
    onnx.save_model(model, str(graph_tmp))
    if own_tmp is not None:
        apply_default_mode(own_tmp)
        os.replace(own_tmp, own)
    else:
        own.unlink(missing_ok=True)
    apply_default_mode(graph_tmp)
    os.replace(graph_tmp, directory / graph_file)
    onnx.checker.check_model(str(directory / graph_file))
