"""Graph preparation for the lint: an ONNX graph's names, producers, consumers and constants
(`Graph`), and its types and shapes at the profile's max shapes - small constants folded, big
weights left unread, then onnxruntime's symbolic shape inference (onnx's own as a fallback) run in
a scratch working directory."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .ops import NO_TYPE_CHECK, RANDOM_OPS


def attr(node, name, default=None):
    """A node attribute's value, or `default` when the node does not set it."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def str_attr(node, name, default: bytes) -> str:
    """A string attribute as text (onnx hands them back as bytes)."""
    value = attr(node, name, default)
    return value.decode() if isinstance(value, bytes) else value


def _prepare_for_inference(model: onnx.ModelProto, base_dir: Path | None, max_elements: int = 1 << 20) -> None:
    """Make `model` (a copy) cheap and self-contained for shape inference, in place: small external
    tensors (biases, norms, index tables) are loaded, so inference can read the values it needs;
    big ones (weights, tables) become graph inputs of the same type and shape, so nothing reads
    or copies them - their values never decide a shape."""
    def as_input(t: TensorProto, name: str):
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))

    def load(t: TensorProto) -> bool:
        if t.data_location != TensorProto.EXTERNAL:
            return True
        if base_dir is None:
            return False
        try:
            onnx.external_data_helper.load_external_data_for_tensor(t, str(base_dir))
        except (OSError, ValueError):
            return False
        t.data_location = TensorProto.DEFAULT
        del t.external_data[:]
        return True

    keep = []
    for t in model.graph.initializer:
        if math.prod(t.dims) <= max_elements and load(t):
            keep.append(t)
        else:
            as_input(t, t.name)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    nodes = []
    for n in model.graph.node:
        t = attr(n, "value") if n.op_type == "Constant" else None
        if isinstance(t, TensorProto) and n.output and not (math.prod(t.dims) <= max_elements and load(t)):
            as_input(t, n.output[0])
            continue
        if isinstance(t, TensorProto) and t.data_location == TensorProto.DEFAULT:
            for a in n.attribute:
                if a.name == "value":
                    a.t.CopyFrom(t)
        nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(_fold_small_constants(model, nodes))


_FOLD_MAX_ELEMENTS = 4096


def _fold_small_constants(model: onnx.ModelProto, nodes: list) -> list:
    """Evaluate, with onnx's reference evaluator, the nodes whose inputs are all small constants
    (e.g. the `-1 % 3` Mod that `torch.unflatten(-1, ...)` leaves in a traced graph to find its
    axis), and replace each by a Constant node holding its result. onnxruntime's symbolic shape
    inference does not compute such values, and without them it cannot follow the Slice ->
    Concat -> Reshape that sizes the attention tensors."""
    from onnx.reference import ReferenceEvaluator

    opsets = {o.domain or "": o.version for o in model.opset_import if o.domain in ("", "ai.onnx")}
    values: dict[str, np.ndarray] = {}
    for t in model.graph.initializer:
        if math.prod(t.dims) <= _FOLD_MAX_ELEMENTS and t.data_location == TensorProto.DEFAULT:
            values[t.name] = numpy_helper.to_array(t)
    folded = []
    for n in nodes:
        if n.op_type == "Constant":
            t = attr(n, "value")
            if isinstance(t, TensorProto) and n.output and math.prod(t.dims) <= _FOLD_MAX_ELEMENTS:
                values[n.output[0]] = numpy_helper.to_array(t)
            folded.append(n)
            continue
        foldable = (n.domain in ("", "ai.onnx") and n.op_type not in RANDOM_OPS | NO_TYPE_CHECK
                    and n.input and all(i in values for i in n.input if i))
        results = None
        if foldable:
            try:
                results = ReferenceEvaluator(n, opsets=opsets).run(None, {i: values[i] for i in n.input if i})
            except Exception:     # an op the reference evaluator lacks: leave it to inference
                results = None
        if results is None or len(results) != len(n.output) or any(
                np.asarray(r).size > _FOLD_MAX_ELEMENTS for r in results):
            folded.append(n)
            continue
        for name, r in zip(n.output, results):
            r = np.asarray(r)
            values[name] = r
            folded.append(onnx.helper.make_node("Constant", [], [name], name=f"{n.name or name}_folded",
                                                value=numpy_helper.from_array(r, name)))
    return folded


@contextlib.contextmanager
def _scratch_cwd():
    """onnxruntime's symbolic shape inference saves a model into the working directory when it
    gives up: run it in a scratch directory, and keep its logger quiet."""
    old = os.getcwd()
    logger = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="ps3edge-lint-") as tmp:
        os.chdir(tmp)
        try:
            yield
        finally:
            os.chdir(old)
            logger.setLevel(level)


def _infer_shapes(model: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str]:
    """Shape and type inference: onnxruntime's symbolic inference (it follows the Shape ->
    Gather -> Concat -> Reshape / Expand arithmetic of traced graphs), else onnx's own."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
        with _scratch_cwd():
            out = SymbolicShapeInference.infer_shapes(model, auto_merge=True)   # works on a copy
        if out is not None:
            return out, ""
    except Exception as e:  # incomplete inference, or an op it does not know
        reason = f"onnxruntime symbolic shape inference failed ({type(e).__name__})"
    else:
        reason = "onnxruntime symbolic shape inference returned nothing"
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True), reason
    except Exception as e:
        return None, f"{reason}; onnx shape inference failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"


def infer_at(model: onnx.ModelProto, max_dims: dict[str, list], base_dir: Path | None
             ) -> tuple[onnx.ModelProto | None, onnx.ModelProto, str]:
    """Infer types and shapes of a copy of `model` whose inputs are fixed to `max_dims` (input name
    -> shape, None where unbounded), prepared as above. Returns the inferred model (None when
    inference failed), the prepared copy, and a note on what failed ("" when nothing did)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in m.graph.input:
        shape = max_dims.get(inp.name)
        if shape is None:
            continue
        for d, v in zip(inp.type.tensor_type.shape.dim, shape):
            if v is not None:
                d.Clear()
                d.dim_value = v
    _prepare_for_inference(m, base_dir)
    inferred, note = _infer_shapes(m)
    return inferred, m, note


def node_label(n) -> str:
    """How findings name a node: its name, else its first output, else its op type."""
    return n.name or (n.output[0] if n.output else n.op_type)


class Graph:
    """Names, producers, consumers, constants and inferred types / shapes of one ONNX graph."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None):
        g = model.graph
        self.model, self.base_dir = model, base_dir
        self.nodes = list(g.node)
        self.initializers = {t.name: t for t in g.initializer}
        self.inputs = [i for i in g.input if i.name not in self.initializers]
        self.outputs = list(g.output)
        self.output_names = {o.name for o in g.output}
        self.producer = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        self.constants: dict[str, TensorProto] = dict(self.initializers)
        for n in self.nodes:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i, name in enumerate(n.input):
                if name:
                    self.consumers.setdefault(name, []).append((n, i))
            if n.op_type == "Constant" and n.output:
                t = attr(n, "value")
                if isinstance(t, TensorProto):
                    self.constants[n.output[0]] = t
                else:
                    for key in ("value_int", "value_ints", "value_float", "value_floats"):
                        v = attr(n, key)
                        if v is not None:
                            dtype = np.int64 if "int" in key else np.float32
                            self.constants[n.output[0]] = numpy_helper.from_array(np.array(v, dtype=dtype))
                            break
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list | None] = {}

    def record_value_infos(self, model: onnx.ModelProto) -> None:
        """Take the types and shapes an inferred model gives; constants' own win."""
        g = model.graph
        for v in list(g.input) + list(g.value_info) + list(g.output):
            tt = v.type.tensor_type
            if not v.type.HasField("tensor_type"):
                continue
            if tt.elem_type:
                self.types[v.name] = tt.elem_type
            if tt.HasField("shape"):
                self.shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        for name, t in self.constants.items():
            self.types[name] = t.data_type
            self.shapes[name] = list(t.dims)

    def constant_input(self, n, idx) -> bool:
        """Whether input `idx` of node `n` is a build-time constant (or absent)."""
        return len(n.input) <= idx or not n.input[idx] or n.input[idx] in self.constants

    def value(self, name: str, max_elements: int = 1 << 22) -> np.ndarray | None:
        """A constant's values (external data loaded on demand), or None."""
        t = self.constants.get(name)
        if t is None:
            return None
        if math.prod(t.dims) > max_elements:
            return None
        if t.data_location == TensorProto.EXTERNAL:
            if self.base_dir is None:
                return None
            t = copy.deepcopy(t)
            try:
                onnx.external_data_helper.load_external_data_for_tensor(t, str(self.base_dir))
            except (OSError, ValueError):
                return None
        try:
            return numpy_helper.to_array(t)
        except Exception:
            return None
