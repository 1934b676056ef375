"""The lint's facts about TensorRT 10.x: which operators its ONNX parser takes, from which version,
on which data types; which inputs are shape tensors; tensor limits; opset ranges; type names.
Data only, read by the checks.

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
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from ...errors import Ps3EdgeError

TOPK_MAX_K = 3840
MAX_TENSOR_ELEMENTS = 2 ** 31 - 1      # TensorRT: volume < 2^31
MAX_RANK = 8                           # nvinfer1::Dims::MAX_DIMS
MAX_SHAPE_TENSOR_ELEMENTS = 64         # TensorRT: a shape tensor's volume must not exceed 64
INT32_MAX = 2 ** 31 - 1
INT32_MIN = -(2 ** 31)
NEWEST_MATRIX = (10, 15)

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
# integer Pow arrived in 10.8; before it, Pow takes only the float types
POW_TYPES_BEFORE_10_8 = _F

# which tensor carries the op's data type (default: input 0)
TYPE_FROM_OUTPUT = {"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "BlackmanWindow",
                     "HammingWindow", "HannWindow"}
TYPE_FROM_INPUT = {"Where": 1}
NO_TYPE_CHECK = {"If", "Loop", "Scan"}

# inputs whose values are shapes, sizes, axes or counts (TensorRT shape tensors)
REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
               "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "ConstantOfShape": (0,), "Tile": (1,), "Slice": (1, 2, 3, 4),
    "Range": (0, 1, 2), "Resize": (2, 3), "Upsample": (1,), "Pad": (1, 3), "TopK": (1,),
    "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "OneHot": (1,), "CumSum": (1,), "Trilu": (1,),
    **{op: (1,) for op in REDUCE_OPS},
}
DATA_DEPENDENT_OUTPUT = {"NonZero", "NonMaxSuppression"}
RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
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


def numpy_dtype_name(elem_type: int) -> str | None:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return None


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


def version_note(version: tuple[int, int]) -> str:
    """A note when the target is newer than the operator list here, which is then applied as is."""
    if version <= NEWEST_MATRIX:
        return ""
    return (f"no operator list for TensorRT {version[0]}.{version[1]} here; checked against "
            f"{NEWEST_MATRIX[0]}.{NEWEST_MATRIX[1]}'s")
