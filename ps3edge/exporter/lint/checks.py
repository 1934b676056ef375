"""The checks of one ONNX graph (see the package docstring for what each finding's `check` means):
`Linter(...).run()` checks the opset, the inputs against the profile and the stage declaration,
infers shapes at the profile max, then checks every node (op, data type, per-op restrictions from
`restrictions.RESTRICTIONS`), INT64 use, shape tensors, and tensor sizes and ranks."""

from __future__ import annotations

import math
from pathlib import Path

import onnx
from onnx import TensorProto

from .findings import Finding, LintReport
from .graph import Graph, attr, infer_at, node_label
from .ops import (DATA_DEPENDENT_OUTPUT, INT32_MAX, INT32_MIN, MAX_RANK, MAX_SHAPE_TENSOR_ELEMENTS,
                  MAX_TENSOR_ELEMENTS, NO_TYPE_CHECK, OPERATORS, POW_TYPES_BEFORE_10_8, RANDOM_OPS,
                  SHAPE_INPUTS, TYPE_FROM_INPUT, TYPE_FROM_OUTPUT, numpy_dtype_name, opset_range, type_name)
from .restrictions import RESTRICTIONS


def _fmt_count(n: int) -> str:
    return f"{n:.3g}" if n >= 1e6 else str(n)


class Linter:
    """The checks of one graph, for one target version, profile and stage declaration; `run()`
    returns their report, findings in the order the checks ran."""

    def __init__(self, model: onnx.ModelProto, version: tuple[int, int], profile: dict | None,
                 declared: dict | None, base_dir: Path | None, stage: str):
        self.model, self.version, self.stage = model, version, stage
        self.profile = profile or {}
        self.declared = declared
        self.g = Graph(model, base_dir)
        self.report = LintReport(trt_version=".".join(map(str, version)))

    def add(self, severity, check, node, op, message):
        self.report.findings.append(Finding(severity, check, node, op, message, self.stage))

    # -- driver
    def run(self) -> LintReport:
        self.check_opset()
        max_dims = self.check_dynamic_dims()
        self.infer(max_dims)
        for n in self.g.nodes:
            self.check_node(n)
        static, reach = self._static_values()
        self.check_int64()
        self.check_casts(static, self._shape_cone())
        self.check_shape_tensors(static, reach)
        self.check_sizes()
        return self.report

    # -- opset and domains
    def check_opset(self):
        lo, hi = opset_range(self.version)
        default = [o for o in self.model.opset_import if o.domain in ("", "ai.onnx")]
        if not default:
            self.add("error", "opset", "model", "graph", "the model imports no ai.onnx opset")
            return
        opset = default[0].version
        if not lo <= opset <= hi:
            self.add("error", "opset", "model", "graph",
                     f"ai.onnx opset {opset}: TensorRT {self.report.trt_version}'s parser takes opsets {lo} to {hi}")

    # -- dynamic dimensions and the profile
    def check_dynamic_dims(self) -> dict[str, list]:
        """Input name -> the shape to infer with (profile max where bounded)."""
        max_dims = {}
        for inp in self.g.inputs:
            tt = inp.type.tensor_type
            decl = self.declared.get(inp.name) if self.declared is not None else None
            self._check_declared(inp, decl)
            if not tt.HasField("shape"):
                self.add("error", "dynamic-dim", inp.name, "input",
                         f"graph input '{inp.name}' has unknown rank; TensorRT needs every input's rank")
                continue
            bounds = self.profile.get(inp.name)
            max_dims[inp.name] = [self._max_dim(inp.name, axis, d, bounds, decl)
                                  for axis, d in enumerate(tt.shape.dim)]
        return max_dims

    def _check_declared(self, inp, decl: dict | None) -> None:
        """The input is in the stage declaration (when there is one), with the declared dtype."""
        if self.declared is not None and decl is None:
            self.add("error", "dynamic-dim", inp.name, "input",
                     f"graph input '{inp.name}' is not in the stage declaration")
        elif decl is not None:
            want = decl.get("dtype")
            have = numpy_dtype_name(inp.type.tensor_type.elem_type)
            if want and have and want != have:
                self.add("error", "dynamic-dim", inp.name, "input",
                         f"graph input '{inp.name}' is {have}, the stage declaration says {want}")

    def _max_dim(self, name: str, axis: int, d, bounds: dict | None, decl: dict | None) -> int | None:
        """Check one input dimension against the profile and the declaration; the size to infer
        with (None where it cannot be bounded)."""
        fixed = d.dim_value if d.HasField("dim_value") else None
        label = d.dim_param or "?"
        declared_dim = None
        if decl is not None and axis < len(decl.get("shape", [])):
            declared_dim = decl["shape"][axis]
        lo = hi = None
        if bounds is not None and axis < len(bounds.get("max", [])):
            lo, hi = bounds["min"][axis], bounds["max"][axis]
        if fixed is not None:
            if hi is not None and not lo == hi == fixed:
                self.add("error", "dynamic-dim", name, "input",
                         f"'{name}' axis {axis} is fixed to {fixed} in the graph but the profile "
                         f"gives [{lo}, {hi}]")
            return fixed
        if hi is None:
            self.add("error", "dynamic-dim", name, "input",
                     f"dynamic dimension '{label}' (axis {axis}) of input '{name}' has no "
                     f"optimization-profile bounds")
            return None
        if decl is not None and not isinstance(declared_dim, str):
            self.add("error", "dynamic-dim", name, "input",
                     f"axis {axis} of '{name}' is dynamic ('{label}') in the graph but the stage "
                     f"declaration fixes it to {declared_dim}: no profile will be built for it")
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            self.add("error", "dynamic-dim", name, "input",
                     f"profile bounds [{lo}, {hi}] of '{name}' axis {axis} are not 1 <= min <= max")
            return None
        return hi

    def infer(self, max_dims):
        inferred, prepared, note = infer_at(self.model, max_dims, self.g.base_dir)
        if note:
            self.report.notes.append(note)
        if inferred is None:
            self.add("warning", "overflow", "model", "graph",
                     "shape inference failed: tensor sizes and ranks at the profile max were not checked")
        self.g.record_value_infos(inferred if inferred is not None else prepared)
        unknown = sum(1 for n in self.g.nodes for o in n.output
                      if o and (self.g.shapes.get(o) is None or None in self.g.shapes[o]))
        if inferred is not None and unknown:
            self.report.notes.append(f"{unknown} tensors have no fully known shape at the profile max; "
                                     f"their sizes were not checked")

    # -- per node: op, types, restrictions, TopK
    def check_node(self, n):
        label, op = node_label(n), n.op_type
        if n.domain not in ("", "ai.onnx"):
            if n.domain == "trt":
                self.add("warning", "op", label, op, f"TensorRT-specific op '{n.domain}::{op}': not checked")
            else:
                self.add("error", "op", label, op,
                         f"op of domain '{n.domain}' needs a TensorRT plugin; the ONNX parser has no importer for it")
            return
        entry = OPERATORS.get(op)
        if entry is None:
            self.add("error", "op", label, op, f"{op} is not supported by the ONNX-TensorRT parser")
            return
        types, since = entry
        if self.version < since:
            self.add("error", "op", label, op,
                     f"{op} needs TensorRT {since[0]}.{since[1]} or newer (target {self.report.trt_version})")
            return
        self.check_dtype(n, label, op, types)
        self.check_restrictions(n, label, op)

    def check_dtype(self, n, label, op, types):
        if op in NO_TYPE_CHECK:
            return
        if op in TYPE_FROM_OUTPUT:
            names = [n.output[0]] if n.output else []
        elif op in ("Cast", "CastLike"):
            names = [n.input[0], n.output[0]]
        else:
            idx = TYPE_FROM_INPUT.get(op, 0)
            names = [n.input[idx]] if len(n.input) > idx and n.input[idx] else []
        if op == "Pow" and self.version < (10, 8):
            types = POW_TYPES_BEFORE_10_8
        for name in names:
            t = self.g.types.get(name)
            if t is None:
                continue
            tn = type_name(t)
            if tn == "DOUBLE":
                self.add("warning", "dtype", label, op,
                         f"{op} on DOUBLE '{name}': TensorRT casts DOUBLE down to FLOAT (limited support)")
            elif tn not in types:
                self.add("error", "dtype", label, op,
                         f"{op} does not take {tn} ('{name}'); TensorRT supports {', '.join(types)}")

    def check_restrictions(self, n, label, op):
        check = RESTRICTIONS.get(op)
        if check is not None:
            check(self, n, lambda msg, sev="error": self.add(sev, "restriction", label, op, msg))

    # -- static / run-time values, and the shape cone
    def _static_values(self) -> tuple[set, dict[str, frozenset]]:
        """Names whose values are known at build time (constants, or computed from constants and
        tensor shapes only), and for the others the graph inputs whose values reach them."""
        static = set(self.g.constants) | {""}
        reach: dict[str, frozenset] = {i.name: frozenset([i.name]) for i in self.g.inputs}
        for n in self.g.nodes:
            if n.op_type in ("Shape", "Size"):
                static.update(o for o in n.output if o)
                continue
            ins = [i for i in n.input if i]
            if n.op_type not in RANDOM_OPS and all(i in static for i in ins):
                static.update(o for o in n.output if o)
                continue
            src = frozenset().union(*(reach.get(i, frozenset()) for i in ins)) if ins else frozenset()
            for o in n.output:
                if o:
                    reach[o] = src
        return static, reach

    def _shape_cone(self) -> set:
        """Tensors whose values only feed shape inputs (backwards from every shape input, stopping
        at Shape / Size, which read dimensions, not values)."""
        cone, stack = set(), []
        for n in self.g.nodes:
            for idx in SHAPE_INPUTS.get(n.op_type, ()):
                if idx < len(n.input) and n.input[idx]:
                    stack.append(n.input[idx])
        while stack:
            name = stack.pop()
            if name in cone:
                continue
            cone.add(name)
            p = self.g.producer.get(name)
            if p is None or p.op_type in ("Shape", "Size"):
                continue
            stack.extend(i for i in p.input if i)
        return cone

    def check_shape_tensors(self, static, reach):
        for n in self.g.nodes:
            label = node_label(n)
            if n.op_type in DATA_DEPENDENT_OUTPUT:
                self.add("error", "shape-tensor", label, n.op_type,
                         f"{n.op_type}'s output size depends on data; ps3edge's TensorRT runtime allocates "
                         f"outputs at the profile's max shape")
            for idx in SHAPE_INPUTS.get(n.op_type, ()):
                if idx >= len(n.input) or not n.input[idx]:
                    continue
                name = n.input[idx]
                shape = self.g.shapes.get(name)
                if shape is not None and None not in shape and math.prod(shape) > MAX_SHAPE_TENSOR_ELEMENTS:
                    self.add("error", "shape-tensor", label, n.op_type,
                             f"shape input '{name}' has {math.prod(shape)} elements; TensorRT shape tensors "
                             f"hold at most {MAX_SHAPE_TENSOR_ELEMENTS}")
                if name in static:
                    continue
                sources = sorted(reach.get(name, ()))
                if sources:
                    why = (f"computed from the values of graph input {', '.join(repr(s) for s in sources)}: a "
                           f"TensorRT shape-tensor input, which ps3edge profiles do not bound")
                else:
                    why = "computed from run-time data: a data-dependent shape"
                self.add("error", "shape-tensor", label, n.op_type, f"{n.op_type} input #{idx} '{name}' is {why}")

    # -- INT64
    def check_int64(self):
        for v, kind in [(i, "input") for i in self.g.inputs] + [(o, "output") for o in self.g.outputs]:
            if v.type.tensor_type.elem_type == TensorProto.INT64:
                self.add("error", "int64", v.name, kind,
                         f"INT64 graph {kind}: ps3edge binds integers as INT32 (TensorRT 10 needs INT64 "
                         f"bindings and runs INT64 on few layers); export it as int32")
        for name, t in self.g.constants.items():
            if t.data_type != TensorProto.INT64:
                continue
            uses = self.g.consumers.get(name, [])
            if uses and all(c.op_type == "Slice" and 1 <= i <= 4 for c, i in uses):
                continue              # Slice clamps starts / ends: INT64_MAX is ONNX's "to the end"
            values = self.g.value(name)
            if values is None or values.size == 0:
                continue
            hi, lo = int(values.max()), int(values.min())
            if hi > INT32_MAX or lo < INT32_MIN:
                worst = hi if hi > INT32_MAX else lo
                node = self.g.producer.get(name)
                self.add("error", "int64", node_label(node) if node else name,
                         node.op_type if node else "initializer",
                         f"INT64 constant '{name}' holds {worst}, beyond INT32 range: beyond TensorRT's "
                         f"2^31 index range, and clamped if cast to INT32")

    def check_casts(self, static, cone):
        for n in self.g.nodes:
            if n.op_type != "Cast" or attr(n, "to") != TensorProto.INT64 or not n.output:
                continue
            out = n.output[0]
            if out in static:
                continue                  # folded at build time
            data_use = out in self.g.output_names
            for c, idx in self.g.consumers.get(out, []):
                if idx in SHAPE_INPUTS.get(c.op_type, ()):
                    continue
                if all(o in cone for o in c.output if o):
                    continue
                data_use = True
            if data_use:
                self.add("warning", "int64", node_label(n), "Cast",
                         f"Cast to INT64 of run-time data ('{out}'): TensorRT runs INT64 on a subset of layers "
                         f"(no MatMul, Conv, Floor, Clip ...); cast to INT32 instead")

    # -- sizes at the profile's max shapes
    def check_sizes(self):
        dims_text = self._profile_text()
        seen = set()
        items = [(i.name, None) for i in self.g.inputs] + [(o, n) for n in self.g.nodes for o in n.output if o]
        for name, n in items:
            if name in seen:
                continue
            seen.add(name)
            shape = self.g.shapes.get(name)
            if shape is None:
                continue
            label = node_label(n) if n is not None else name
            op = n.op_type if n is not None else "input"
            if len(shape) > MAX_RANK:
                self.add("error", "rank", label, op,
                         f"'{name}' has rank {len(shape)}; TensorRT tensors have at most {MAX_RANK} dimensions")
            if None in shape or (n is not None and n.op_type == "Constant"):
                continue
            count = math.prod(shape)
            self.report.largest_tensor = max(self.report.largest_tensor, count)
            if count > MAX_TENSOR_ELEMENTS:
                self.add("error", "overflow", label, op,
                         f"{tuple(shape)} = {_fmt_count(count)} elements at the profile max{dims_text}; "
                         f"TensorRT tensors hold < 2^31")

    def _profile_text(self) -> str:
        named = {}
        for inp in self.g.inputs:
            b = self.profile.get(inp.name)
            tt = inp.type.tensor_type
            if b is None or not tt.HasField("shape"):
                continue
            for axis, d in enumerate(tt.shape.dim):
                if d.dim_param and axis < len(b.get("max", [])):
                    named[d.dim_param] = b["max"][axis]
        return f" ({', '.join(f'{k}={v}' for k, v in named.items())})" if named else ""
