"""Per-op restrictions (the `restriction` and `topk` checks): what a node of a supported op must look
like, beyond its data type, for the target TensorRT's ONNX parser to import it (onnx-tensorrt
`docs/operators.md`, restated). `RESTRICTIONS` maps an op type to its check.

Each check is called as `check(lint, node, add)`: `lint` is the running linter (its `g`, the graph
view, its `version`, and its `add` for findings of another check), `add(message, severity="error")`
records a `restriction` finding on the node."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .graph import attr, node_label, str_attr
from .ops import REDUCE_OPS, TOPK_MAX_K

_RESIZE_TRANSFORMS = ("half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners")


def _topk(lint, n, add):
    if attr(n, "sorted", 1) != 1:
        add("TopK needs sorted=1")
    k = lint.g.value(n.input[1]) if len(n.input) > 1 and n.input[1] else None
    if k is None and len(n.input) < 2:
        k = np.array([attr(n, "k", 0)])
    if k is None:
        lint.add("warning", "topk", node_label(n), n.op_type,
                 f"TopK's K is not a constant: cannot check it against the limit {TOPK_MAX_K}")
    elif int(np.max(k)) > TOPK_MAX_K:
        lint.add("error", "topk", node_label(n), n.op_type,
                 f"TopK K={int(np.max(k))} exceeds TensorRT's limit of {TOPK_MAX_K}")


def _resize(lint, n, add):
    mode = str_attr(n, "mode", b"nearest")
    if mode not in ("nearest", "linear"):
        add(f"Resize mode '{mode}' is not among the parser's documented modes (nearest, linear)",
            "warning" if mode == "cubic" else "error")
    if attr(n, "antialias", 0):
        add("Resize with antialias is not supported")
    ctm = str_attr(n, "coordinate_transformation_mode", b"half_pixel")
    if ctm not in _RESIZE_TRANSFORMS:
        add(f"Resize coordinate_transformation_mode '{ctm}' is not supported")
    policy = str_attr(n, "keep_aspect_ratio_policy", b"stretch")
    if policy != "stretch":
        add(f"Resize keep_aspect_ratio_policy '{policy}' is not supported (only stretch)")


def _layer_normalization(lint, n, add):
    if any(o for o in n.output[1:]):
        add("LayerNormalization: only the first output (Y) is supported")


def _pool(lint, n, add):
    op = n.op_type
    if op == "MaxPool" and len(n.output) > 1 and n.output[1]:
        add("MaxPool's Indices output is not supported")
    dil = attr(n, "dilations")
    if dil and any(d != 1 for d in dil):
        add(f"{op} dilations must be all ones, got {list(dil)}")
    shape = lint.g.shapes.get(n.input[0])
    if op != "LpPool" and shape is not None and len(shape) not in (4, 5):
        add(f"{op}: 2D or 3D pooling only (input rank {len(shape)})")


def _constant_input_1(lint, n, add):
    """Reduce* axes, CumSum's axis, OneHot's depth: build-time constants in every version."""
    if not lint.g.constant_input(n, 1):
        what = {"CumSum": "axis", "OneHot": "depth"}.get(n.op_type, "axes")
        add(f"{n.op_type}'s {what} input must be a build-time constant")


def _constant_until(idx: int, since: tuple[int, int], message: str):
    """A check that input `idx` is a constant on targets older than `since` (when tensor inputs
    there became supported); `message` may name the op as {op}."""
    def check(lint, n, add):
        if lint.version < since and not lint.g.constant_input(n, idx):
            add(message.format(op=n.op_type))
    return check


def _quantize(lint, n, add):
    if len(n.input) > 2 and n.input[2]:
        zp = lint.g.value(n.input[2])
        if zp is None:
            add("zero point must be a constant 0")
        elif np.any(zp.astype(np.float64) != 0):
            add("zero point must be 0 (TensorRT quantization is symmetric)")


def _scatter_nd(lint, n, add):
    red = str_attr(n, "reduction", b"none")
    if red != "none":
        add(f"ScatterND reduction '{red}' is not supported")


def _dropout(lint, n, add):
    if len(n.input) > 2 and n.input[2]:
        tm = lint.g.value(n.input[2])
        if tm is None or bool(np.any(tm)):
            add("Dropout's training_mode must be a constant False")


def _einsum(lint, n, add):
    if lint.version < (10, 12) and "..." in str_attr(n, "equation", b""):
        add("Einsum with ellipsis needs TensorRT 10.12 or newer")


def _constant(lint, n, add):
    if any(a.name in ("sparse_value", "value_string", "value_strings") for a in n.attribute):
        add("Constant with sparse or string values is not supported")


_squeeze = _constant_until(1, (10, 7), "{op}'s axes must resolve to a constant before TensorRT 10.7")

RESTRICTIONS: dict[str, Callable] = {
    "TopK": _topk,
    "Resize": _resize,
    "LayerNormalization": _layer_normalization,
    "MaxPool": _pool, "AveragePool": _pool, "LpPool": _pool,
    **{op: _constant_input_1 for op in REDUCE_OPS + ("CumSum", "OneHot")},
    "Slice": _constant_until(3, (10, 3), "Slice's axes input must be a constant before TensorRT 10.3"),
    "Pad": _constant_until(3, (10, 4), "Pad's axes input must be a constant before TensorRT 10.4"),
    "Squeeze": _squeeze, "Unsqueeze": _squeeze,
    "QuantizeLinear": _quantize, "DequantizeLinear": _quantize,
    "ScatterND": _scatter_nd,
    "Dropout": _dropout,
    "Einsum": _einsum,
    "Constant": _constant,
}
