"""TensorRT-compatibility lint: checks ONNX graphs, without TensorRT, against what the ONNX-TensorRT
parser of a target TensorRT 10.x accepts, and what an engine built with ps3edge's optimization
profiles can hold. `ps3edge inspect --lint ARTIFACTS` runs it on every stage of an artifact.

This module owns the operator allow-list and the checks. Each finding names a severity (`error`:
the parser or builder rejects it, or the ps3edge TensorRT runtime cannot run it; `warning`: it
builds, but loses precision or speed, or could not be verified), the node, the op and one line.

Where the facts come from (restated here, not copied):
- Operators, their supported types and restrictions: onnx/onnx-tensorrt `docs/operators.md` for
  TensorRT 10.15 ("supports operators in the inclusive range of opset 9 to opset 24"). Its
  TensorRT 10.0 edition gives opset 9 to 20; we apply 9..20 below 10.15.
- Operators and relaxations added between 10.0 and 10.15: onnx-tensorrt `CHANGELOG.md`
  (10.1 DeformConv; 10.3 tensor `axes` for Slice; 10.4 tensor `axes` for Pad, Blackman/Hamming/
  HannWindow; 10.5 STFT; 10.7 dynamic axes for Squeeze/Unsqueeze; 10.8 integer Pow; 10.12
  Einsum ellipsis/diagonal/broadcast; 10.14 Attention; 10.15 RotaryEmbedding, RMSNormalization,
  TensorScatter). The "supported types" column is the 10.15 one for every version.
- TopK: `ITopKLayer::setK` "only values up to 3840 are supported" (TensorRT 10 API).
- Tensor limits: `ITensor` "the volume of the tensor must be less than 2^31 elements";
  `Dims::MAX_DIMS` = 8 (TensorRT 10 API).
- INT64: since TensorRT 9 the parser keeps INT64 (no automatic cast to INT32) and INT64 I/O needs
  INT64 bindings; only the ops whose row lists INT64 run it.

Checks (the `check` field of a finding):
  opset         the ai.onnx opset must lie in the target's range; other domains need plugins
  op            the op must be supported by the target version's parser
  restriction   per-op restrictions: TopK `sorted`; Resize modes / antialias / aspect policy;
                LayerNormalization extra outputs; pooling rank, dilations, MaxPool indices;
                axes / axis / depth inputs that must be build-time constants (Reduce*, CumSum,
                OneHot, and Slice / Pad / Squeeze / Unsqueeze before 10.3 / 10.4 / 10.7);
                Q/DQ zero points; ScatterND reduction; Dropout training; Einsum before 10.12;
                Constant sparse / string values
  topk          TopK's K must be a constant <= 3840
  dtype         each op's data type must be in its supported-types row (DOUBLE: a warning, the
                parser casts it down to FLOAT)
  int64         INT64 graph inputs / outputs (ps3edge binds integers as INT32); INT64 constants
                beyond INT32 range (ONNX's Slice "to the end" sentinel excepted); Casts to INT64
                whose run-time result feeds data rather than shapes
  shape-tensor  shape-tensor patterns: a shape input (Reshape / Expand / Tile / ConstantOfShape /
                Slice / Range / Resize sizes / Pad pads / TopK K / axes inputs ...) computed from
                run-time values - from a graph input (a TensorRT shape-tensor input, which ps3edge
                profiles do not bound) or from data (a data-dependent shape); ops whose output
                size depends on data (NonZero, NonMaxSuppression); shape tensors with more than
                64 elements
  dynamic-dim   every symbolic or unknown input dimension must be bounded by the optimization
                profile and declared dynamic by the stage declaration; fixed dimensions must
                match the profile; declared dtypes must match the graph
  overflow      at the profile's max shapes, no tensor may reach 2^31 elements (attention scores
                of a highres call with many steps are the tensor that hits it)
  rank          no tensor may have more than 8 dimensions
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .. import defaults
from ..errors import Ps3EdgeError

TOPK_MAX_K = 3840
MAX_TENSOR_ELEMENTS = 2 ** 31 - 1      # TensorRT: volume < 2^31
MAX_RANK = 8                           # nvinfer1::Dims::MAX_DIMS
MAX_SHAPE_TENSOR_ELEMENTS = 64         # TensorRT: a shape tensor's volume must not exceed 64
INT32_MAX = 2 ** 31 - 1
INT32_MIN = -(2 ** 31)
NEWEST_MATRIX = (10, 15)
SEVERITIES = ("error", "warning")

# --- the operator allow-list (onnx-tensorrt docs/operators.md, TensorRT 10.15) ----------------
_F = ("FP32", "FP16", "BF16")
_FI = _F + ("INT32", "INT64")
_FIB = _FI + ("BOOL",)
_CONST = _F + ("FP8", "FP4", "INT4", "INT32", "INT64", "BOOL")
_CAST = _F + ("INT32", "INT64", "UINT8", "BOOL")

# op -> (supported types of the op's data tensor, first TensorRT version whose parser takes it)
_V10 = (10, 0)
OPERATORS: dict[str, tuple[tuple[str, ...], tuple[int, int]]] = {
    **{op: (_FI, _V10) for op in (
        "Abs", "Add", "ArgMax", "ArgMin", "DepthToSpace", "Div", "Equal", "Greater", "GreaterOrEqual",
        "IsNaN", "Less", "LessOrEqual", "Max", "Min", "Mod", "Mul", "Neg", "Pad", "Pow", "Range",
        "Relu", "Scatter", "ScatterElements", "ScatterND", "Shrink", "Sign", "SpaceToDepth", "Sub",
        "Sum", "TopK", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
        "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
    **{op: (_FIB, _V10) for op in (
        "Concat", "Expand", "EyeLike", "Flatten", "Gather", "GatherElements", "GatherND", "Identity",
        "If", "Loop", "OneHot", "Reshape", "ReverseSequence", "Shape", "Size", "Slice", "Split",
        "Squeeze", "Tile", "Transpose", "Trilu", "Unsqueeze", "Where")},
    **{op: (_F, _V10) for op in (
        "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "BatchNormalization", "Ceil",
        "Celu", "Clip", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "Dropout", "Einsum", "Elu",
        "Erf", "Exp", "Floor", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool",
        "GroupNormalization", "GRU", "HardSigmoid", "HardSwish", "Hardmax", "ImageScaler",
        "InstanceNormalization", "IsInf", "LayerNormalization", "LeakyRelu", "Log", "LogSoftmax",
        "LRN", "LSTM", "LpNormalization", "LpPool", "MatMul", "MaxPool", "MeanVarianceNormalization",
        "ParametricSoftplus", "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike",
        "RandomUniform", "RandomUniformLike", "Reciprocal", "Resize", "RNN", "Round", "ScaledTanh",
        "Scan", "Selu", "Sigmoid", "Sin", "Sinh", "Softmax", "Softplus", "Softsign", "Sqrt", "Tan",
        "Tanh", "ThresholdedRelu", "Upsample")},
    **{op: (("FP32", "FP16"), _V10) for op in ("GridSample", "Mish", "NonMaxSuppression", "NonZero",
                                               "RoiAlign")},
    "And": (("BOOL",), _V10), "Or": (("BOOL",), _V10), "Xor": (("BOOL",), _V10), "Not": (("BOOL",), _V10),
    "Cast": (_CAST, _V10), "CastLike": (_CAST, _V10),
    "Constant": (_CONST, _V10), "ConstantOfShape": (_CONST, _V10),
    "DequantizeLinear": (("INT8", "FP8", "FP4", "INT4"), _V10),
    "Gelu": (_F + ("INT8", "INT32", "INT64"), _V10),
    "Mean": (_F + ("FP8", "INT32", "INT64"), _V10),
    "DeformConv": (("FP32", "FP16"), (10, 1)),
    **{op: (("FP32", "FP16"), (10, 4)) for op in ("BlackmanWindow", "HammingWindow", "HannWindow")},
    "STFT": (("FP32",), (10, 5)),
    "Attention": (_F + ("INT8", "FP8"), (10, 14)),
    "RotaryEmbedding": (_F, (10, 15)), "RMSNormalization": (_F, (10, 15)),
    "TensorScatter": (_F + ("INT32",), (10, 15)),
}

# which tensor carries the op's data type (default: input 0)
_TYPE_FROM_OUTPUT = {"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "BlackmanWindow",
                     "HammingWindow", "HannWindow"}
_TYPE_FROM_INPUT = {"Where": 1}
_NO_TYPE_CHECK = {"If", "Loop", "Scan"}

# inputs whose values are shapes, sizes, axes or counts (TensorRT shape tensors)
_REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
               "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "ConstantOfShape": (0,), "Tile": (1,), "Slice": (1, 2, 3, 4),
    "Range": (0, 1, 2), "Resize": (2, 3), "Upsample": (1,), "Pad": (1, 3), "TopK": (1,),
    "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "OneHot": (1,), "CumSum": (1,), "Trilu": (1,),
    **{op: (1,) for op in _REDUCE_OPS},
}
_DATA_DEPENDENT_OUTPUT = {"NonZero", "NonMaxSuppression"}
_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
               "Multinomial"}

_TYPE_NAMES = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL", TensorProto.INT8: "INT8", TensorProto.DOUBLE: "DOUBLE",
    TensorProto.FLOAT8E4M3FN: "FP8",
}
for _name, _label in (("INT4", "INT4"), ("FLOAT4E2M1", "FP4")):
    if hasattr(TensorProto, _name):
        _TYPE_NAMES[getattr(TensorProto, _name)] = _label


def type_name(elem_type: int) -> str:
    if elem_type in _TYPE_NAMES:
        return _TYPE_NAMES[elem_type]
    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return f"type {elem_type}"


def _numpy_dtype_name(elem_type: int) -> str | None:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return None


# --- results ------------------------------------------------------------------------------------
@dataclass
class Finding:
    severity: str          # "error" | "warning"
    check: str             # see the module docstring
    node: str              # node name, or the tensor / graph element concerned
    op: str                # op type, or "graph" / "input" / "output"
    message: str           # one line
    stage: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LintReport:
    trt_version: str
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    largest_tensor: int = 0        # elements of the largest tensor at the profile max

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"trt_version": self.trt_version, "ok": self.ok, "errors": len(self.errors),
                "warnings": len(self.warnings), "largest_tensor": self.largest_tensor,
                "notes": list(self.notes), "findings": [f.to_dict() for f in self.findings]}


# --- versions -----------------------------------------------------------------------------------
def parse_trt_version(text) -> tuple[int, int]:
    """'10.3', '10.3.0.26' or 10 -> (10, 3). The lint knows TensorRT 10 and later."""
    parts = str(text).strip().split(".")
    try:
        major = int(parts[0])
        minor = int(parts[1]) if len(parts) > 1 and parts[1] != "" else 0
    except ValueError:
        raise Ps3EdgeError(f"--trt-version must look like 10.3, got '{text}'") from None
    if major < 10:
        raise Ps3EdgeError(f"the lint checks TensorRT 10 and newer (ps3edge's engines need TensorRT 10); "
                           f"got {text}")
    return major, minor


def opset_range(version: tuple[int, int]) -> tuple[int, int]:
    return (9, 24) if version >= NEWEST_MATRIX else (9, 20)


# --- graph helpers ------------------------------------------------------------------------------
def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _fmt_count(n: int) -> str:
    return f"{n:.3g}" if n >= 1e6 else str(n)


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
        t = _attr(n, "value") if n.op_type == "Constant" else None
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
            t = _attr(n, "value")
            if isinstance(t, TensorProto) and n.output and math.prod(t.dims) <= _FOLD_MAX_ELEMENTS:
                values[n.output[0]] = numpy_helper.to_array(t)
            folded.append(n)
            continue
        foldable = (n.domain in ("", "ai.onnx") and n.op_type not in _RANDOM_OPS | _NO_TYPE_CHECK
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


def _infer(model: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str]:
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


class _Graph:
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
                t = _attr(n, "value")
                if isinstance(t, TensorProto):
                    self.constants[n.output[0]] = t
                else:
                    for key in ("value_int", "value_ints", "value_float", "value_floats"):
                        v = _attr(n, key)
                        if v is not None:
                            dtype = np.int64 if "int" in key else np.float32
                            self.constants[n.output[0]] = numpy_helper.from_array(np.array(v, dtype=dtype))
                            break
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list | None] = {}

    def record_value_infos(self, model: onnx.ModelProto) -> None:
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


# --- the checks ---------------------------------------------------------------------------------
class _Linter:
    def __init__(self, model, version, profile, declared, base_dir, stage):
        self.model, self.version, self.stage = model, version, stage
        self.profile = profile or {}
        self.declared = declared
        self.g = _Graph(model, base_dir)
        self.report = LintReport(trt_version=".".join(map(str, version)))

    def add(self, severity, check, node, op, message):
        self.report.findings.append(Finding(severity, check, node, op, message, self.stage))

    def node_label(self, n) -> str:
        return n.name or (n.output[0] if n.output else n.op_type)

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
            dims = list(tt.shape.dim) if tt.HasField("shape") else None
            bounds = self.profile.get(inp.name)
            decl = self.declared.get(inp.name) if self.declared is not None else None
            if self.declared is not None and decl is None:
                self.add("error", "dynamic-dim", inp.name, "input",
                         f"graph input '{inp.name}' is not in the stage declaration")
            elif decl is not None:
                want = decl.get("dtype")
                have = _numpy_dtype_name(tt.elem_type)
                if want and have and want != have:
                    self.add("error", "dynamic-dim", inp.name, "input",
                             f"graph input '{inp.name}' is {have}, the stage declaration says {want}")
            if dims is None:
                self.add("error", "dynamic-dim", inp.name, "input",
                         f"graph input '{inp.name}' has unknown rank; TensorRT needs every input's rank")
                continue
            shape = []
            for axis, d in enumerate(dims):
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
                        self.add("error", "dynamic-dim", inp.name, "input",
                                 f"'{inp.name}' axis {axis} is fixed to {fixed} in the graph but the profile "
                                 f"gives [{lo}, {hi}]")
                    shape.append(fixed)
                    continue
                if hi is None:
                    self.add("error", "dynamic-dim", inp.name, "input",
                             f"dynamic dimension '{label}' (axis {axis}) of input '{inp.name}' has no "
                             f"optimization-profile bounds")
                    shape.append(None)
                    continue
                if decl is not None and not isinstance(declared_dim, str):
                    self.add("error", "dynamic-dim", inp.name, "input",
                             f"axis {axis} of '{inp.name}' is dynamic ('{label}') in the graph but the stage "
                             f"declaration fixes it to {declared_dim}: no profile will be built for it")
                if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
                    self.add("error", "dynamic-dim", inp.name, "input",
                             f"profile bounds [{lo}, {hi}] of '{inp.name}' axis {axis} are not 1 <= min <= max")
                    shape.append(None)
                    continue
                shape.append(hi)
            max_dims[inp.name] = shape
        return max_dims

    def infer(self, max_dims):
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        for inp in m.graph.input:
            shape = max_dims.get(inp.name)
            if shape is None:
                continue
            for d, v in zip(inp.type.tensor_type.shape.dim, shape):
                if v is not None:
                    d.Clear()
                    d.dim_value = v
        _prepare_for_inference(m, self.g.base_dir)
        inferred, note = _infer(m)
        if note:
            self.report.notes.append(note)
        if inferred is None:
            self.add("warning", "overflow", "model", "graph",
                     "shape inference failed: tensor sizes and ranks at the profile max were not checked")
        self.g.record_value_infos(inferred if inferred is not None else m)
        unknown = sum(1 for n in self.g.nodes for o in n.output
                      if o and (self.g.shapes.get(o) is None or None in self.g.shapes[o]))
        if inferred is not None and unknown:
            self.report.notes.append(f"{unknown} tensors have no fully known shape at the profile max; "
                                     f"their sizes were not checked")

    # -- per node: op, types, restrictions, TopK
    def check_node(self, n):
        label, op = self.node_label(n), n.op_type
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
        if op in _NO_TYPE_CHECK:
            return
        if op in _TYPE_FROM_OUTPUT:
            names = [n.output[0]] if n.output else []
        elif op in ("Cast", "CastLike"):
            names = [n.input[0], n.output[0]]
        else:
            idx = _TYPE_FROM_INPUT.get(op, 0)
            names = [n.input[idx]] if len(n.input) > idx and n.input[idx] else []
        if op == "Pow" and self.version < (10, 8):
            types = _F
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

    def _const_input(self, n, idx) -> bool:
        return len(n.input) <= idx or not n.input[idx] or n.input[idx] in self.g.constants

    def check_restrictions(self, n, label, op):
        add = lambda msg, sev="error": self.add(sev, "restriction", label, op, msg)
        v = self.version
        if op == "TopK":
            if _attr(n, "sorted", 1) != 1:
                add("TopK needs sorted=1")
            k = self.g.value(n.input[1]) if len(n.input) > 1 and n.input[1] else None
            if k is None and len(n.input) < 2:
                k = np.array([_attr(n, "k", 0)])
            if k is None:
                self.add("warning", "topk", label, op,
                         f"TopK's K is not a constant: cannot check it against the limit {TOPK_MAX_K}")
            elif int(np.max(k)) > TOPK_MAX_K:
                self.add("error", "topk", label, op,
                         f"TopK K={int(np.max(k))} exceeds TensorRT's limit of {TOPK_MAX_K}")
        elif op == "Resize":
            mode = _attr(n, "mode", b"nearest")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if mode not in ("nearest", "linear"):
                add(f"Resize mode '{mode}' is not among the parser's documented modes (nearest, linear)",
                    "warning" if mode == "cubic" else "error")
            if _attr(n, "antialias", 0):
                add("Resize with antialias is not supported")
            ctm = _attr(n, "coordinate_transformation_mode", b"half_pixel")
            ctm = ctm.decode() if isinstance(ctm, bytes) else ctm
            if ctm not in ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"):
                add(f"Resize coordinate_transformation_mode '{ctm}' is not supported")
            policy = _attr(n, "keep_aspect_ratio_policy", b"stretch")
            policy = policy.decode() if isinstance(policy, bytes) else policy
            if policy != "stretch":
                add(f"Resize keep_aspect_ratio_policy '{policy}' is not supported (only stretch)")
        elif op == "LayerNormalization":
            if any(o for o in n.output[1:]):
                add("LayerNormalization: only the first output (Y) is supported")
        elif op in ("MaxPool", "AveragePool", "LpPool"):
            if op == "MaxPool" and len(n.output) > 1 and n.output[1]:
                add("MaxPool's Indices output is not supported")
            dil = _attr(n, "dilations")
            if dil and any(d != 1 for d in dil):
                add(f"{op} dilations must be all ones, got {list(dil)}")
            shape = self.g.shapes.get(n.input[0])
            if op != "LpPool" and shape is not None and len(shape) not in (4, 5):
                add(f"{op}: 2D or 3D pooling only (input rank {len(shape)})")
        elif op in _REDUCE_OPS or op == "CumSum" or op == "OneHot":
            if not self._const_input(n, 1):
                what = {"CumSum": "axis", "OneHot": "depth"}.get(op, "axes")
                add(f"{op}'s {what} input must be a build-time constant")
        elif op == "Slice" and v < (10, 3) and not self._const_input(n, 3):
            add("Slice's axes input must be a constant before TensorRT 10.3")
        elif op == "Pad" and v < (10, 4) and not self._const_input(n, 3):
            add("Pad's axes input must be a constant before TensorRT 10.4")
        elif op in ("Squeeze", "Unsqueeze") and v < (10, 7) and not self._const_input(n, 1):
            add(f"{op}'s axes must resolve to a constant before TensorRT 10.7")
        elif op in ("QuantizeLinear", "DequantizeLinear"):
            if len(n.input) > 2 and n.input[2]:
                zp = self.g.value(n.input[2])
                if zp is None:
                    add("zero point must be a constant 0")
                elif np.any(zp.astype(np.float64) != 0):
                    add("zero point must be 0 (TensorRT quantization is symmetric)")
        elif op == "ScatterND":
            red = _attr(n, "reduction", b"none")
            red = red.decode() if isinstance(red, bytes) else red
            if red != "none":
                add(f"ScatterND reduction '{red}' is not supported")
        elif op == "Dropout":
            if len(n.input) > 2 and n.input[2]:
                tm = self.g.value(n.input[2])
                if tm is None or bool(np.any(tm)):
                    add("Dropout's training_mode must be a constant False")
        elif op == "Einsum" and v < (10, 12):
            eq = _attr(n, "equation", b"")
            eq = eq.decode() if isinstance(eq, bytes) else eq
            if "..." in eq:
                add("Einsum with ellipsis needs TensorRT 10.12 or newer")
        elif op == "Constant":
            if any(a.name in ("sparse_value", "value_string", "value_strings") for a in n.attribute):
                add("Constant with sparse or string values is not supported")

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
            if n.op_type not in _RANDOM_OPS and all(i in static for i in ins):
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
            label = self.node_label(n)
            if n.op_type in _DATA_DEPENDENT_OUTPUT:
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
                self.add("error", "int64", self.node_label(node) if node else name,
                         node.op_type if node else "initializer",
                         f"INT64 constant '{name}' holds {worst}, beyond INT32 range: beyond TensorRT's "
                         f"2^31 index range, and clamped if cast to INT32")

    def check_casts(self, static, cone):
        for n in self.g.nodes:
            if n.op_type != "Cast" or _attr(n, "to") != TensorProto.INT64 or not n.output:
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
                self.add("warning", "int64", self.node_label(n), "Cast",
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
            label = self.node_label(n) if n is not None else name
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


def group_findings(findings: list[Finding]) -> list[tuple[Finding, int]]:
    """Fold findings that differ only in node and tensor names (one per block, say): the first of
    each group and how many there are, in order."""
    import re

    groups: dict[tuple, list] = {}
    for f in findings:
        key = (f.severity, f.stage, f.check, f.op, re.sub(r"'[^']*'", "''", f.message))
        groups.setdefault(key, [f, 0])[1] += 1
    return [(f, n) for f, n in groups.values()]


def _version_note(version: tuple[int, int]) -> str:
    if version <= NEWEST_MATRIX:
        return ""
    return (f"no operator list for TensorRT {version[0]}.{version[1]} here; checked against "
            f"{NEWEST_MATRIX[0]}.{NEWEST_MATRIX[1]}'s")


def lint_model(model, trt_version=defaults.DEFAULT_LINT_TRT_VERSION, profile: dict | None = None,
               declared: dict | None = None, base_dir=None, stage: str = "") -> LintReport:
    """Lint one ONNX model (a ModelProto or a path).

    profile: input name -> {"min", "opt", "max"} shapes (one stage of engines.profiles.profile_bounds);
             every symbolic input dimension must be bounded here.
    declared: input name -> {"dtype", "shape"} from the stage declaration (manifest), if any.
    """
    version = parse_trt_version(trt_version)
    report = _lint_stage(model, version, profile, declared, base_dir, stage)
    if _version_note(version):
        report.notes.append(_version_note(version))
    _sort_findings(report)
    return report


def _lint_stage(model, version: tuple[int, int], profile, declared, base_dir, stage) -> LintReport:
    if isinstance(model, (str, Path)):
        path = Path(model)
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:
            raise Ps3EdgeError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        base_dir = path.parent if base_dir is None else base_dir
    return _Linter(model, version, profile, declared, Path(base_dir) if base_dir else None, stage).run()


def _sort_findings(report: LintReport) -> None:
    order = {s: i for i, s in enumerate(SEVERITIES)}
    report.findings.sort(key=lambda f: order.get(f.severity, 9))


def lint_artifacts(artifact_dir, trt_version=defaults.DEFAULT_LINT_TRT_VERSION, max_look_close=None,
                   manifest=None, precision: str = "fp32") -> tuple[LintReport, int]:
    """Lint every stage of an artifact against the profiles a build would use: the FP32 stage
    files, or the FP16 / INT8 ones 'ps3edge calibrate' registered (`precision`).

    Returns one report (findings carry their stage) and T_max, the steps per highres call bounded."""
    from ..artifact.precisions import stage_files
    from ..artifact.profiles import look_close_steps, profile_bounds
    from ..artifact.manifest import load_manifest

    artifact_dir = Path(artifact_dir)
    if manifest is None:
        manifest = load_manifest(artifact_dir, verify=True)
    files = stage_files(manifest, precision, artifact_dir)
    t_max = look_close_steps(manifest, max_look_close)
    bounds = profile_bounds(manifest, max_look_close)
    version = parse_trt_version(trt_version)
    report = LintReport(trt_version=".".join(map(str, version)))
    if _version_note(version):
        report.notes.append(_version_note(version))
    for stage, info in manifest.stages.items():
        declared = {t.name: t.to_dict() for t in info.inputs}
        r = _lint_stage(artifact_dir / files[stage], version, bounds.get(stage), declared, artifact_dir, stage)
        report.findings.extend(r.findings)
        report.notes.extend(f"{stage}: {n}" for n in r.notes)
        report.largest_tensor = max(report.largest_tensor, r.largest_tensor)
    _sort_findings(report)
    return report, t_max
