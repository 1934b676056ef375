"""onnxruntime's graph optimizations of the exported stages: what a stage file keeps, and what an
onnxruntime CPU session adds when it loads one.

- `simplify_stage`, at export: onnxruntime's basic-level rewrites (constant folding, the shape
  arithmetic of the traced graph, common subexpressions, redundant nodes), saved as the stage
  file. They use standard ONNX ops only, so the file stays what TensorRT's ONNX parser and the
  lint (exporter/lint/) read; the graph halves in nodes and loads faster, and computes the same.
  The basic level's fusions of compute ops (MatMul + Add -> Gemm, Conv + Add / Mul / BN) are
  left out: the compute ops stay as exported, named by their blocks, which INT8 calibration
  selects by (calibration/int8.py) and the FP32 results are checked against.
- `fuse_attention`, at session creation on the CPU execution provider: each attention (the
  Q.K^T -> Softmax -> .V subgraph the exporter writes for scaled_dot_product_attention) becomes
  one `com.microsoft.MultiHeadAttention`. onnxruntime's CPU kernel for it tiles the scores,
  where the plain subgraph writes every step's full score matrix (at 4K, 2 steps: 2x4x2560x3289
  floats a block) and reads it back twice; the high-res stage then runs about as fast as our
  torch stage. It is a contrib op that TensorRT has no importer for, so it is never saved in a
  stage file: the onnxruntime runner applies it in memory (runtime/runners/onnxruntime.py).

Extended-level fusions (BiasGelu, SkipLayerNormalization, FusedMatMul) are contrib ops as well;
onnxruntime applies those by itself when a session loads, so nothing here repeats them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
from onnx import helper, numpy_helper

from ..errors import Ps3EdgeError
from .ort_session import cpu_session_options

CONTRIB_DOMAIN = "com.microsoft"
# session config keys of onnxruntime (onnxruntime_session_options_config_keys.h)
_SAVE_DATA_FILE = "session.optimized_model_external_initializers_file_name"
_SAVE_DATA_MIN_BYTES = "session.optimized_model_external_initializers_min_size_in_bytes"
# onnxruntime's basic-level rewrites that merge compute ops (see the module docstring)
KEEP_COMPUTE_OPS = ["MatMulAddFusion", "ConvAddFusion", "ConvMulFusion", "ConvBNFusion"]


def simplify_stage(path: Path, scratch: Path, data_name: str | None = None) -> list[Path]:
    """Replace the stage file at `path` (and its external data file `data_name` beside it, if it
    has one) by onnxruntime's basic-level optimization of it. Returns the files now in place, as
    onnx_export._export_stage does: the model, then its data file if any."""
    import onnxruntime as ort

    path, scratch = Path(path), Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    out = scratch / path.name
    options = cpu_session_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    if data_name:
        options.add_session_config_entry(_SAVE_DATA_FILE, data_name)
        options.add_session_config_entry(_SAVE_DATA_MIN_BYTES, "1024")
    try:
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=KEEP_COMPUTE_OPS)
    except Exception as e:  # onnxruntime raises its own exception types for models it cannot load
        raise Ps3EdgeError(f"onnxruntime cannot load the exported {path.name}: {str(e).splitlines()[0]}") from None
    model = onnx.load(str(out), load_external_data=False)
    _keep_used_opsets(model)
    onnx.save_model(model, str(out))          # the graph only: external references stay as written
    onnx.checker.check_model(str(out))
    written = [path]
    out.replace(path)
    if data_name:
        (scratch / data_name).replace(path.parent / data_name)
        written.append(path.parent / data_name)
    shutil.rmtree(scratch, ignore_errors=True)
    return written


def _keep_used_opsets(model: onnx.ModelProto) -> None:
    """onnxruntime's saved model imports every domain it knows; keep the default one and those a
    node uses, so that the file declares no more than the exporter wrote."""
    used = {n.domain for n in model.graph.node}
    kept = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def fuse_attention(model: onnx.ModelProto, num_heads: int) -> int:
    """Rewrite, in place, each attention of `model` into one MultiHeadAttention node.

    The pattern is what torch's exporter writes for `scaled_dot_product_attention` with the
    default scale over heads made by `(B,L,C) -> Reshape (B,L,H,D) -> Transpose`:
        Mul(Transpose(Reshape(q)), s) . Mul(Transpose(Reshape(k), 0,2,3,1), s) -> Softmax
        -> . Transpose(Reshape(v)) -> Transpose(0,2,1,3) -> Reshape (B,N,C)
    where s = sqrt(1/sqrt(D)) is computed from the query's shape (a Sqrt), or a scalar constant
    where the shapes are static and folded (then the product of the two is the fused node's scale).
    MultiHeadAttention takes the token-major q (B,N,C), k and v (B,L,C) and returns (B,N,C).
    Anything else (a mask, another head layout) is left as it is.
    Returns how many attentions were fused."""
    graph = model.graph
    nodes = list(graph.node)     # one set of node objects for the whole rewrite (ids key on them)
    producer = {o: n for n in nodes for o in n.output}
    constants = {t.name: t for t in graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in nodes
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    consumers: dict[str, list] = {}
    for n in nodes:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    fused = {}                   # id of the output Reshape -> (the attention node, the Reshape rewired)
    for softmax in (n for n in nodes if n.op_type == "Softmax"):
        match = _attention(softmax, producer, consumers, constants)
        if match is not None:
            q, k, v, reshape, scale = match
            extra = {} if scale is None else {"scale": scale}
            attention = helper.make_node(
                "MultiHeadAttention", [q, k, v], [f"{softmax.name}/MultiHeadAttention_output_0"],
                name=f"{softmax.name}/MultiHeadAttention", domain=CONTRIB_DOMAIN, num_heads=num_heads, **extra)
            # the Reshape stays (its target may also flatten to (B*N,C)): it reads the attention's
            # (B,N,C) output as it read the plain graph's (B,N,H,D), the same numbers in the same order
            fed = helper.make_node("Reshape", [attention.output[0], reshape.input[1]], list(reshape.output),
                                   name=reshape.name, **{a.name: helper.get_attribute_value(a) for a in reshape.attribute})
            fused[id(reshape)] = (attention, fed)
    if not fused:
        return 0
    rewritten = [m for n in nodes for m in fused.get(id(n), (n,))]
    rewritten = _live(rewritten, {o.name for o in graph.output})
    del graph.node[:]
    graph.node.extend(rewritten)
    if not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return len(fused)


def _perm(node) -> list | None:
    return next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)


def _only_consumer(name: str, consumers, op_type: str):
    users = consumers.get(name, [])
    return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def _heads_source(name: str, producer, perm: list) -> str | None:
    """The token-major (B,L,C) tensor that Transpose(Reshape(x), perm) makes heads of, or None."""
    transpose = producer.get(name)
    if transpose is None or transpose.op_type != "Transpose" or _perm(transpose) != perm:
        return None
    reshape = producer.get(transpose.input[0])
    return reshape.input[0] if reshape is not None and reshape.op_type == "Reshape" else None


def _from_shape(name: str, producer, hops: int = 6) -> bool:
    """Whether `name` is computed from a Shape within `hops` nodes (the default scale's chain
    Sqrt(Cast(Div(1, Sqrt(Cast(Slice(Shape(q)))))))."""
    frontier = [name]
    for _ in range(hops):
        nodes = [producer[n] for n in frontier if n in producer]
        if any(n.op_type == "Shape" for n in nodes):
            return True
        frontier = [i for n in nodes for i in n.input if i]
    return False


def _scale(names: list, producer, constants):
    """The attention's scale from its two Mul factors: None for the default 1/sqrt(D) (both a
    Sqrt of a value computed from the query's shape), their product where both are one-number
    constants, else False (an explicit scale left unfolded: not matched)."""
    if all(producer.get(n) is not None and producer[n].op_type == "Sqrt" and _from_shape(producer[n].input[0], producer)
           for n in names):
        return None
    values = [numpy_helper.to_array(constants[n]) for n in names if n in constants]
    if len(values) != 2 or any(v.size != 1 for v in values):
        return False
    return float(values[0].reshape(()) * values[1].reshape(()))


def _attention(softmax, producer, consumers, constants):
    """(q, k, v, the output Reshape, scale) of the attention around `softmax`, or None."""
    scores = producer.get(softmax.input[0])
    weighted = _only_consumer(softmax.output[0], consumers, "MatMul")
    if scores is None or scores.op_type != "MatMul" or weighted is None or weighted.input[0] != softmax.output[0]:
        return None
    scaled = [producer.get(i) for i in scores.input]
    if any(m is None or m.op_type != "Mul" for m in scaled):
        return None
    scale = _scale([m.input[1] for m in scaled], producer, constants)
    if scale is False:
        return None
    q = _heads_source(scaled[0].input[0], producer, [0, 2, 1, 3])
    k = _heads_source(scaled[1].input[0], producer, [0, 2, 3, 1])
    v = _heads_source(weighted.input[1], producer, [0, 2, 1, 3])
    merge = _only_consumer(weighted.output[0], consumers, "Transpose")
    if None in (q, k, v) or merge is None or _perm(merge) != [0, 2, 1, 3]:
        return None
    reshape = _only_consumer(merge.output[0], consumers, "Reshape")
    if reshape is None or _copies_a_head_dim(reshape, constants):
        return None
    return q, k, v, reshape, scale


def _copies_a_head_dim(reshape, constants) -> bool:
    """A constant Reshape target with a 0 (copy the input's dimension) past the first two: it
    would copy (B,N,C)'s C where the plain graph copied (B,N,H,D)'s H."""
    if reshape.input[1] not in constants:
        return False
    target = numpy_helper.to_array(constants[reshape.input[1]]).reshape(-1)
    return bool((target[2:] == 0).any())


def _live(nodes: list, outputs: set) -> list:
    """`nodes` (in topological order) without those no graph output depends on any more."""
    needed, kept = set(outputs), []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(i for i in n.input if i)
    return kept[::-1]
