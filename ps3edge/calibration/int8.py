"""INT8 by explicit quantization: Q/DQ pairs in the ONNX graph, the form TensorRT 10 builds
(its implicit calibrators are deprecated) and onnxruntime runs.

Placement (what TensorRT fuses): Q/DQ on the inputs of the weighted MatMul / Conv / Gemm nodes
only - activations per tensor, weights per output channel, both symmetric INT8 (zero point 0),
biases left in float. Attention's two activation x activation MatMuls, LayerNorm, Softmax, GELU
and the residual adds stay in float, as do:
  - the selector stage (never quantized: it decides where PS3 looks);
  - with `exclude_selection_branch` (the default), the layers in lowres that only feed the
    selector: `selection_feature_proj` and the ShallowConvNet. On random weights the selector's
    ranking is decided by small differences of cosines, and INT8 noise in its inputs moved the
    selection measurably (see docs/precision.md, INT8); they are a few percent of the FLOPs;
  - the transformer blocks named by `exclude_blocks` ("first", "last" or indices).

Calibration statistics are gathered here, per activation tensor, over the samples of
stage_inputs.StageInputs (one sample at a time), and thresholded by histogram.AbsHistogram:
  max         the largest |x| seen;
  percentile  the CALIBRATION_PERCENTILE-th percentile of |x| (2048-bin histogram);
  entropy     TensorRT's entropy calibration: the |x| threshold whose 128-level quantized
              distribution has the least KL divergence from the 2048-bin histogram.
The thresholds become onnxruntime `TensorQuantOverrides`, and onnxruntime's QDQ quantizer writes
the graph. Where NVIDIA Model Optimizer (`modelopt.onnx.quantization`) is installed, `tool="auto"`
uses it instead for max / entropy (it has no percentile), with the same node selection.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from .. import defaults
from ..artifact.io import temp_prefix
from ..errors import Ps3EdgeError
from ..runtime.runners.onnxruntime import cpu_session_options
from .data import FeedReader
from .histogram import AbsHistogram

METHODS = ("max", "entropy", "percentile")
TOOLS = ("auto", "onnxruntime", "modelopt")
QUANTIZED_OP_TYPES = ("MatMul", "Conv", "Gemm")
SELECTION_BRANCH_SCOPES = ("selection_feature_proj", "highres_selection_feature_module")
_BLOCK = re.compile(r"(?:^|/)blocks\.(\d+)/")


# ------------------------------------------------------------------------------------------
# which nodes
# ------------------------------------------------------------------------------------------

def parse_exclude_blocks(text, depth: int) -> tuple[int, ...]:
    """'first,last,3' -> block indices; '' or 'none' -> ()."""
    if text is None:
        return ()
    items = text if isinstance(text, (list, tuple)) else str(text).split(",")
    blocks = set()
    for item in items:
        item = str(item).strip().lower()
        if item in ("", "none"):
            continue
        if item == "first":
            blocks.add(0)
        elif item == "last":
            blocks.add(depth - 1)
        else:
            try:
                b = int(item)
            except ValueError:
                raise Ps3EdgeError(f"--exclude-blocks takes first, last or block numbers, got '{item}'") from None
            if not -depth <= b < depth:
                raise Ps3EdgeError(f"--exclude-blocks: block {b} does not exist in a {depth}-block model")
            blocks.add(b % depth)
    return tuple(sorted(blocks))


def trunk_block(node_name: str) -> int | None:
    if any(scope in node_name for scope in SELECTION_BRANCH_SCOPES):
        return None
    m = _BLOCK.search(node_name)
    return int(m.group(1)) if m else None


@dataclass
class Selection:
    quantize: list[str] = field(default_factory=list)           # node names
    excluded: dict[str, str] = field(default_factory=dict)      # node name -> reason
    activations: list[str] = field(default_factory=list)        # tensors that get Q/DQ


def select_nodes(model: onnx.ModelProto, stage: str, depth: int, exclude_blocks=(),
                 exclude_selection_branch: bool = True) -> Selection:
    """The weighted MatMul / Conv / Gemm nodes of a stage, split into quantized and excluded."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    sel = Selection()
    blocks_seen = set()
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OP_TYPES or len(node.input) < 2 or node.input[1] not in consts:
            continue
        block = trunk_block(node.name)
        if block is not None:
            blocks_seen.add(block)
        if stage == "selector":
            sel.excluded[node.name] = "selector stage"
        elif exclude_selection_branch and any(s in node.name for s in SELECTION_BRANCH_SCOPES):
            sel.excluded[node.name] = "selector input"
        elif block is not None and block in exclude_blocks:
            sel.excluded[node.name] = f"block {block}"
        else:
            sel.quantize.append(node.name)
            if node.input[0] not in sel.activations:
                sel.activations.append(node.input[0])
    if stage in ("lowres", "highres") and blocks_seen != set(range(depth)):
        raise Ps3EdgeError(f"cannot find the {depth} transformer blocks in the {stage} graph "
                           f"(found {sorted(blocks_seen)}); re-export the model with this ps3edge")
    return sel


# ------------------------------------------------------------------------------------------
# calibration statistics
# ------------------------------------------------------------------------------------------

def collect_thresholds(model_path: Path, activations: list[str], reader: FeedReader, method: str) -> dict[str, float]:
    """Run the FP32 stage with `activations` as extra outputs over every sample; |x| threshold each."""
    import onnxruntime as ort

    model = onnx.load(str(model_path), load_external_data=False)
    graph_inputs = {i.name for i in model.graph.input}
    existing = {o.name for o in model.graph.output}
    fetched = [n for n in activations if n not in graph_inputs]
    for name in fetched:
        if name not in existing:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    # next to the original, so that its external data (if any) resolves the same way
    fd, tmp = tempfile.mkstemp(dir=model_path.parent, prefix=temp_prefix(model_path.stem, "calib"), suffix=".onnx")
    os.close(fd)
    augmented = Path(tmp)
    try:
        onnx.save_model(model, str(augmented))
        del model
        session = ort.InferenceSession(str(augmented), cpu_session_options(), providers=["CPUExecutionProvider"])
    finally:
        augmented.unlink(missing_ok=True)
    inputs = [i.name for i in session.get_inputs()]
    stats = {name: AbsHistogram() for name in activations}
    absmax = {name: 0.0 for name in activations}
    reader.rewind()
    while (feed := reader.get_next()) is not None:
        values = dict(zip(fetched, session.run(fetched, {k: feed[k] for k in inputs})))
        for name in activations:
            value = feed[name] if name in graph_inputs else values[name]
            if method == "max":
                absmax[name] = max(absmax[name], float(np.abs(value).max()) if value.size else 0.0)
            else:
                stats[name].add(value)
        del values, feed
    del session
    if method == "max":
        return absmax
    if method == "percentile":
        return {n: h.percentile(defaults.CALIBRATION_PERCENTILE) for n, h in stats.items()}
    return {n: h.entropy() for n, h in stats.items()}


# ------------------------------------------------------------------------------------------
# writing the Q/DQ graph
# ------------------------------------------------------------------------------------------

def modelopt_available() -> str | None:
    """Model Optimizer's version when its ONNX PTQ can be imported (and takes a data reader)."""
    try:
        import modelopt
        from modelopt.onnx.quantization import quantize  # noqa: F401
    except Exception:  # ImportError, or its own dependencies missing
        return None
    if "calibration_data_reader" not in inspect.signature(quantize).parameters:
        return None
    return getattr(modelopt, "__version__", "unknown")


def resolve_tool(tool: str, method: str) -> str:
    if tool not in TOOLS:
        raise Ps3EdgeError(f"unknown quantization tool '{tool}'; choose one of: {', '.join(TOOLS)}")
    if method not in METHODS:
        raise Ps3EdgeError(f"unknown calibration method '{method}'; choose one of: {', '.join(METHODS)}")
    have_modelopt = modelopt_available() is not None
    if tool == "modelopt":
        if not have_modelopt:
            raise Ps3EdgeError("NVIDIA Model Optimizer's ONNX quantization is not installed (or too old to take a "
                               "calibration data reader); pip install 'nvidia-modelopt[onnx]' or use --tool onnxruntime")
        if method == "percentile":
            raise Ps3EdgeError("Model Optimizer calibrates with max or entropy only; use --tool onnxruntime for percentile")
        return "modelopt"
    if tool == "auto" and have_modelopt and method != "percentile":
        return "modelopt"
    return "onnxruntime"


def tool_version(tool: str) -> str:
    if tool == "modelopt":
        return f"modelopt {modelopt_available()}"
    import onnxruntime
    return f"onnxruntime {onnxruntime.__version__}"


def quantize_stage(src: Path, dst: Path, stage: str, selection: Selection, feeds: list[Callable[[], dict]],
                   method: str, tool: str, large: bool, progress: Callable[[str], None] | None = None) -> dict:
    """Write the Q/DQ model of one stage to `dst` (plus `dst`.data when `large`)."""
    say = progress or (lambda msg: None)
    reader = FeedReader(feeds, progress=lambda m: say(f"calibrating {stage}: {m}"), label="sample")
    if tool == "modelopt":
        _quantize_modelopt(src, dst, selection, reader, method, large)
        return {"activation_thresholds": None}
    thresholds = collect_thresholds(src, selection.activations, reader, method)
    say(f"writing the Q/DQ graph of {stage}")
    _quantize_onnxruntime(src, dst, selection, thresholds, feeds[0], large)
    return {"activation_thresholds": {k: float(v) for k, v in thresholds.items()}}


def _quantize_onnxruntime(src: Path, dst: Path, selection: Selection, thresholds: dict[str, float],
                          first_feed: Callable[[], dict], large: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    overrides = {}
    for name, t in thresholds.items():
        t = np.float32(max(t, 1e-6))
        overrides[name] = [{"rmin": -t, "rmax": t, "symmetric": True}]
    extra = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "MatMulConstBOnly": True,
        "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OP_TYPES),
        "QuantizeBias": False,
        "QDQKeepRemovableActivations": True,
        "TensorQuantOverrides": overrides,
    }
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), _calibration_source(overrides, first_feed) as source:
            quantize_static(
                str(src), str(dst), quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(QUANTIZED_OP_TYPES), per_channel=True, reduce_range=False,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_quantize=list(selection.quantize), nodes_to_exclude=list(selection.excluded),
                use_external_data_format=large, calibrate_method=CalibrationMethod.MinMax,
                extra_options=extra, **source)
    except Ps3EdgeError:
        raise
    except Exception as e:  # onnxruntime raises plain exceptions for graphs it cannot quantize
        raise Ps3EdgeError(f"onnxruntime could not quantize {src.name}: {str(e).splitlines()[0]}") from None
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _calibration_source(overrides: dict, first_feed: Callable[[], dict]):
    """quantize_static's calibration arguments. Every activation range comes from our statistics
    (TensorQuantOverrides), so onnxruntime's own calibration pass is a formality. Where
    quantize_static reads a calibration cache (onnxruntime 1.32 here), a cache of those same ranges
    replaces the pass, and the graph written is byte for byte the same (an INT8 calibration of
    ps3-tiny on two samples: 11.0 -> 6.4 s; the pass runs the stage with a min and a max on every
    tensor, after computing its input). Without the cache, the pass runs over one sample with the
    cheap in-graph min/max method."""
    from onnxruntime.quantization import CalibrationMethod, quantize_static
    try:
        from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data
    except ImportError:
        save_tensors_data = None
    if save_tensors_data is None or "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        yield {"calibration_data_reader": FeedReader([first_feed])}
        return
    ranges = {name: (o[0]["rmin"], o[0]["rmax"]) for name, o in overrides.items()}
    with tempfile.TemporaryDirectory(prefix="ps3edge-calibration-") as tmp:
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)
        yield {"calibration_data_reader": None, "calibration_cache_path": str(cache)}


def _quantize_modelopt(src: Path, dst: Path, selection: Selection, reader: FeedReader, method: str,
                       large: bool) -> None:
    """NVIDIA Model Optimizer's ONNX PTQ with our node selection (never run on the machines of
    this project: modelopt's ONNX extra pins another onnx and onnxruntime-gpu)."""
    from modelopt.onnx.quantization import quantize

    exact = lambda names: [f"^{re.escape(n)}$" for n in names]
    try:
        quantize(onnx_path=str(src), quantize_mode="int8", calibration_data_reader=reader,
                 calibration_method=method, calibration_eps=["cpu"],
                 op_types_to_quantize=list(QUANTIZED_OP_TYPES),
                 nodes_to_quantize=exact(selection.quantize), nodes_to_exclude=exact(selection.excluded),
                 high_precision_dtype="fp32", disable_mha_qdq=True, use_external_data_format=large,
                 output_path=str(dst), log_level="WARNING")
    except Exception as e:  # modelopt raises plain exceptions
        raise Ps3EdgeError(f"Model Optimizer could not quantize {src.name}: {str(e).splitlines()[0]}") from None


def tidy_qdq(model: onnx.ModelProto, selection: Selection) -> int:
    """onnxruntime hands the dequantized activation to every consumer of the tensor (the Shape
    nodes of the attention reshapes, say); give those back the float tensor, so Q/DQ sits on
    MatMul / Conv / Gemm inputs only, and drop pairs left without users. Returns nodes removed."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    wanted = set(selection.quantize)
    for node in graph.node:
        if node.op_type in QUANTIZED_OP_TYPES and node.name in wanted:
            continue
        for k, t in enumerate(node.input):
            dq = producer.get(t)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[k] = q.input[0]
    removed = 0
    while True:
        used = {t for n in graph.node for t in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            return removed
        for n in dead:
            graph.node.remove(n)
        removed += len(dead)


def check_qdq(model: onnx.ModelProto, selection: Selection) -> list[str]:
    """Every DequantizeLinear feeds a selected MatMul / Conv / Gemm; returns the quantized nodes."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    wanted = set(selection.quantize)
    quantized, stray = set(), []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        for user in consumers.get(node.output[0], []):
            if user.op_type in QUANTIZED_OP_TYPES and user.name in wanted:
                quantized.add(user.name)
            else:
                stray.append(f"{user.op_type} {user.name}")
    if stray:
        raise Ps3EdgeError(f"Q/DQ landed outside MatMul/Conv/Gemm inputs: {', '.join(stray[:5])}")
    return [n for n in selection.quantize if n in quantized]


def int8_precision_map(selection: Selection, quantized: list[str]) -> dict:
    from .precision import PRECISION_MAP_SCHEMA
    return {
        "schema": PRECISION_MAP_SCHEMA,
        "default": "fp32",
        "io_dtype": "float32",
        "quantized_nodes": list(quantized),
        "fp32_op_types": [],
        "fp32_regions": sorted(set(selection.excluded.values())),
        "fp32_nodes": list(selection.excluded),
        "fp32_tensors": [],
        "tensorrt": {"strongly_typed": True, "builder_flags": []},
    }
