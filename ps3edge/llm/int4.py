"""Weight-only INT4 of a VILA-HD artifact's LLM: the block-wise quantizers and the host-side
INT4 token embedding.

Two routes write `llm.int4.onnx` from `llm.onnx`:
- onnxruntime (the default, run everywhere): onnxruntime's MatMulNBits quantizer, round to
  nearest per block of `block_size` weights along K, every MatMul with a constant weight (the
  attention and MLP projections and the output head) becomes a com.microsoft MatMulNBits node.
  Only onnxruntime runs these (its CPU and CUDA providers; TensorRT's parser does not).
- modelopt (where NVIDIA Model Optimizer is importable): its INT4-AWQ, which writes the weights as
  INT4 DequantizeLinear -> MatMul for TensorRT, scaled by activations of a few calibration prompts.

The token embedding is a gather on the host (pipeline.py), so it is quantized with the same
quantizer's block arithmetic (onnxruntime's GatherBlockQuantized layout: blocks along the hidden
axis of each row) and `Int4Embedding` dequantizes only the rows a prompt looks up, exactly as
onnxruntime's GatherBlockQuantized kernel would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from .. import defaults
from ..errors import Ps3EdgeError

INT4_TOOLS = ("auto", "onnxruntime", "modelopt")
FORMATS = {"onnxruntime": "MatMulNBits", "modelopt": "QDQ"}      # how llm.int4.onnx holds its weights


@dataclass(frozen=True)
class Int4Settings:
    """The quantizer's settings, as vila.json records them."""
    block_size: int = defaults.INT4_BLOCK_SIZE
    symmetric: bool = defaults.INT4_SYMMETRIC
    accuracy_level: int = defaults.INT4_ACCURACY_LEVEL
    bits: int = 4

    def validate(self) -> "Int4Settings":
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise Ps3EdgeError(f"INT4 block size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise Ps3EdgeError(f"MatMulNBits accuracy level must be 0-4, got {self.accuracy_level}")
        return self

    def to_dict(self) -> dict:
        return {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric,
                "accuracy_level": self.accuracy_level}


# ------------------------------------------------------------------------------------------
# which route
# ------------------------------------------------------------------------------------------

def modelopt_int4_available() -> str | None:
    """Model Optimizer's version when its ONNX INT4 quantizer can be imported."""
    try:
        import modelopt
        from modelopt.onnx.quantization.int4 import quantize  # noqa: F401
    except Exception:  # ImportError, or its own dependencies missing
        return None
    return getattr(modelopt, "__version__", "unknown")


def resolve_tool(tool: str) -> str:
    """auto: Model Optimizer's INT4-AWQ where it is installed (the TensorRT route), else onnxruntime."""
    if tool not in INT4_TOOLS:
        raise Ps3EdgeError(f"unknown INT4 tool '{tool}'; choose one of: {', '.join(INT4_TOOLS)}")
    have = modelopt_int4_available() is not None
    if tool == "modelopt" and not have:
        raise Ps3EdgeError("NVIDIA Model Optimizer's ONNX INT4 quantization is not installed; pip install "
                           "'nvidia-modelopt[onnx]' (in its own environment) or use --tool onnxruntime")
    return "modelopt" if tool == "modelopt" or (tool == "auto" and have) else "onnxruntime"


def tool_version(tool: str) -> str:
    if tool == "modelopt":
        return f"modelopt {modelopt_int4_available()} int4 {defaults.INT4_AWQ_METHOD}"
    import onnxruntime
    return f"onnxruntime {onnxruntime.__version__} MatMulNBits"


# ------------------------------------------------------------------------------------------
# the LLM graph
# ------------------------------------------------------------------------------------------

def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """The MatMul nodes whose second input is a constant 2-D weight: what both routes quantize."""
    inits = {i.name: i for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2]


def _quantizer_module():
    """onnxruntime's matmul_nbits_quantizer, imported without its side effect: at import it calls
    logging.basicConfig(level=INFO), which would print a line per graph node on every command's
    stderr; a handler on the root logger for the duration makes that call do nothing."""
    placeholder = logging.NullHandler()
    root = logging.getLogger()
    root.addHandler(placeholder)
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    except ImportError as e:      # its onnx_ir dependency: the vila extra
        raise Ps3EdgeError(f"onnxruntime's INT4 quantizer cannot be imported ({e}); pip install onnx-ir "
                           f"(the vila extra: pip install 'ps3edge[vila]')") from None
    finally:
        root.removeHandler(placeholder)
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    return matmul_nbits_quantizer


def quantize_onnxruntime(model: onnx.ModelProto, settings: Int4Settings) -> onnx.ModelProto:
    """onnxruntime's MatMulNBits quantizer (round to nearest, block-wise along K) over every weight
    MatMul; returns the quantized model."""
    from onnxruntime.quantization import QuantFormat

    nbits = _quantizer_module()
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=settings.block_size, is_symmetric=settings.symmetric,
                                          accuracy_level=settings.accuracy_level or None,
                                          quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",))
    quantizer = nbits.MatMulNBitsQuantizer(model, algo_config=config, nodes_to_include=weight_matmuls(model))
    quantizer.process()
    return quantizer.model.model


def quantize_modelopt(model_path: Path, settings: Int4Settings,
                      feeds: list[Callable[[], dict]]) -> onnx.ModelProto:
    """NVIDIA Model Optimizer's INT4-AWQ (its documented `modelopt.onnx.quantization.int4.quantize`),
    every weight MatMul included (its default leaves /lm_head out; ours is quantized on both
    routes). Never run on the machines of this project: modelopt's ONNX extra pins another onnx
    and onnxruntime-gpu."""
    from modelopt.onnx.quantization.int4 import quantize

    from ..calibration.data import FeedReader

    try:
        return quantize(str(model_path), calibration_method=defaults.INT4_AWQ_METHOD,
                        calibration_data_reader=FeedReader(feeds), calibration_eps=["cpu"],
                        use_external_data_format=False, use_zero_point=not settings.symmetric,
                        block_size=settings.block_size, nodes_to_exclude=[], log_level="WARNING")
    except Exception as e:  # modelopt raises plain exceptions
        raise Ps3EdgeError(f"Model Optimizer could not quantize {model_path.name}: {str(e).splitlines()[0]}") from None


def check_quantized(model: onnx.ModelProto, expected: list[str], fmt: str) -> list[str]:
    """The quantized graph holds no float MatMul weight any more: every node of `expected` became
    a MatMulNBits (or, QDQ, has its DequantizeLinear). Returns the quantized nodes' names."""
    inits = {i.name for i in model.graph.initializer}
    left = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    if left:
        raise Ps3EdgeError(f"the INT4 quantizer left {len(left)} MatMul weights in float: {left[:3]}")
    # QDQ: one DequantizeLinear per weight (Model Optimizer may put a reshape or transpose between
    # it and its MatMul, so the nodes are counted rather than followed)
    kind = "MatMulNBits" if fmt == "MatMulNBits" else "DequantizeLinear"
    done = [n.name for n in model.graph.node if n.op_type == kind]
    if len(done) != len(expected):
        raise Ps3EdgeError(f"the INT4 quantizer wrote {len(done)} {kind} nodes for {len(expected)} MatMul weights")
    return done


# ------------------------------------------------------------------------------------------
# MatMulNBits arithmetic (what its kernel computes from the blobs)
# ------------------------------------------------------------------------------------------

def _nibbles(packed: np.ndarray, index: np.ndarray) -> np.ndarray:
    """4-bit values at flat element `index` of `packed` (two per byte, the lower nibble first)."""
    flat = packed.reshape(-1)
    return (flat[index // 2] >> (4 * (index % 2)).astype(np.uint8)) & 0xF


def dequantize_matmulnbits(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None,
                           k: int, n: int, block_size: int) -> np.ndarray:
    """The (K, N) float weight a MatMulNBits node's blobs stand for: (q - zp) * scale per block of
    K, zero point 8 when the node has none (symmetric)."""
    blocks = (k + block_size - 1) // block_size
    q = packed.reshape(n, blocks, block_size // 2)
    low, high = q & 0xF, q >> 4
    values = np.stack([low, high], axis=-1).reshape(n, blocks, block_size).astype(np.float32)
    if zero_points is None:
        zp = np.full((n, blocks), 8, np.float32)
    else:               # (N, ceil(blocks / 2)) bytes: each column's zero points start on a byte
        row = 2 * zero_points.reshape(n, -1).shape[1]
        zp = _nibbles(zero_points, np.arange(n)[:, None] * row + np.arange(blocks)[None]).astype(np.float32)
    w = (values - zp[..., None]) * scales.reshape(n, blocks)[..., None].astype(np.float32)
    return w.reshape(n, blocks * block_size)[:, :k].T


# ------------------------------------------------------------------------------------------
# the token embedding
# ------------------------------------------------------------------------------------------

def quantize_embedding(table: np.ndarray, settings: Int4Settings) -> dict[str, np.ndarray]:
    """The (V, H) table block-wise along H by the quantizer's own arithmetic (its Gather path:
    DefaultWeightOnlyQuantizer.quantize_ndarray, quantize axis 1), as the arrays `Int4Embedding`
    reads."""
    table = np.ascontiguousarray(table, dtype=np.float32)
    packed, scales, zero_points = _quantizer_module().DefaultWeightOnlyQuantizer.quantize_ndarray(
        table, 1, settings.block_size, settings.symmetric)
    arrays = {"packed": packed, "scales": scales.astype(np.float32),
              "shape": np.asarray(table.shape, np.int64), "block_size": np.asarray(settings.block_size, np.int64)}
    if zero_points is not None:
        arrays["zero_points"] = zero_points
    return arrays


class Int4Embedding:
    """The host-side INT4 token embedding: `table[ids]` dequantizes just those rows ((q - zp) *
    scale, or q * scale for symmetric, q signed), as GatherBlockQuantized does; `shape` as the
    float table's."""

    def __init__(self, arrays):
        self.packed = np.asarray(arrays["packed"])
        self.scales = np.asarray(arrays["scales"], np.float32)
        self.zero_points = np.asarray(arrays["zero_points"]) if "zero_points" in arrays else None
        self.shape = tuple(int(d) for d in arrays["shape"])
        self.block_size = int(arrays["block_size"])
        self.dtype = np.dtype(np.float32)
        vocab, hidden = self.shape
        blocks = -(-hidden // self.block_size)
        if self.packed.size != -(-vocab * hidden // 2) or self.scales.shape != (vocab, blocks):
            raise Ps3EdgeError("the INT4 embedding's arrays do not match its shape; run 'ps3edge calibrate "
                               "--precision int4' again")

    @classmethod
    def load(cls, path: Path) -> "Int4Embedding":
        with np.load(path) as npz:
            return cls({k: npz[k] for k in npz.files})

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + (self.zero_points.nbytes if self.zero_points is not None else 0)

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        vocab, hidden = self.shape
        if ids.size and (ids.min() < -vocab or ids.max() >= vocab):
            raise IndexError(f"token id out of range for a vocabulary of {vocab}")
        rows = np.where(ids < 0, ids + vocab, ids).reshape(-1)
        cols = np.arange(hidden)
        q = _nibbles(self.packed, rows[:, None] * hidden + cols[None]).astype(np.int16)
        block = cols // self.block_size
        scale = self.scales[rows[:, None], block[None]]
        if self.zero_points is None:
            q = np.where(q >= 8, q - 16, q)                        # signed int4, two's complement
            out = q.astype(np.float32) * scale
        else:
            blocks = self.scales.shape[1]
            zp = _nibbles(self.zero_points, rows[:, None] * blocks + block[None]).astype(np.float32)
            out = (q.astype(np.float32) - zp) * scale
        return out.reshape(ids.shape + (hidden,))
