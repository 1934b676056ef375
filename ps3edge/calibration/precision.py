"""FP16 precision policy: which parts of each stage run in FP16 and which stay FP32, the
converter that writes it into an ONNX stage, and the precision map that tells the TensorRT
builder the same thing.

What stays FP32 (the policy)
  lowres    the image-space region: every node that depends on `pixels` without passing through
            a weighted layer (the bicubic-resize gathers and taps); every LayerNormalization (mean and variance over the
            channels) and Softmax (attention over >= 729 keys); constant sub-graphs that feed
            only FP32 nodes.
  selector  the whole stage: L2 normalisation, cosines, max-pool, clamp and sigmoid. It is about
            1e-4 of the model's FLOPs and it decides where PS3 looks, so it is not worth a risk.
  highres   LayerNormalization and Softmax.
Everything else that computes on floats (matrix products, convolutions, GELU, residual adds,
the attention scale, the position-table gather) runs in FP16.

The stage boundary (`FP16_BUFFERS`): a tensor that passes from one FP16 stage to another, or to
the runtime's assembly, is an FP16 graph input / output, so the buffers between the stages are
half size and nothing casts them up and down again: lowres's kv_cache and lowres_features,
highres's patches, kv_cache and highres_features. Each is produced, and read, by FP16 nodes on
both sides (highres reads its patches and K/V with an FP16 MatMul / Gather), so the buffer
changes no value the model computes, except that of the patches: the runtime cuts them from the
FP32 pixels in FP32 (model/patches.py) and rounds them to float16 when it feeds them, instead of
at highres's first layer, the same rounding. The entry (pixels) and the selector's inputs (selection_features,
conv_features: the selector runs FP32) stay float32, and the runtime's result is float32 (cast
once where it assembles the tokens). The precision map records every float input and output's
dtype ("io_dtypes"); the runtime declares the stages' tensors from it.

The precision map, the manifest's precisions.<p>.stages.<stage>.precision_map (schema 1):

    {
      "schema": 1,
      "default": "fp16",           # every float layer not listed below: "fp32" | "fp16"
      "io_dtype": "float32",       # dtype of the float graph inputs / outputs: float32 | float16 | mixed
      "io_dtypes": {"pixels": "float32", "kv_cache": "float16", ...},   # each float input / output
      "fp32_op_types": ["LayerNormalization", "Softmax"],   # the rule, for people
      "fp32_regions": ["image-space"],                       # the rule, for people
      "fp32_nodes": ["/Gather", ...],        # ONNX node names (of the FP32 stage file) kept FP32
      "fp32_tensors": ["/Gather_output_0", ...],   # the float outputs of those nodes
      "quantized_nodes": [...],    # INT8 only: the nodes whose inputs carry Q/DQ
      "tensorrt": {"strongly_typed": false, "builder_flags": ["FP16", "OBEY_PRECISION_CONSTRAINTS"]}
    }

How a TensorRT builder applies an FP16 map: parse the stage's FP32 ONNX file,
set the builder flags listed under "tensorrt", and for every
layer where `fp32_layer_matcher(map)(layer.name, [layer.get_output(i).name ...])` is true set
`layer.precision = trt.float32` and `layer.set_output_type(i, trt.float32)` on its float
outputs. The ONNX parser keeps tensor names and names layers after their node, so either matches.
The converted `<stage>.fp16.onnx` holds the same policy as explicit casts: onnxruntime runs it,
and a strongly typed network parsed from it obeys it without flags. An INT8 map has
"default": "fp32" and "strongly_typed": true - the Q/DQ graph carries its own types; "fp32_*"
then lists the weighted layers that were excluded from quantization.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import Ps3EdgeError

PRECISION_MAP_SCHEMA = 1
FP32_OP_TYPES = ("LayerNormalization", "Softmax")
WHOLE_STAGE_FP32 = ("selector",)
IMAGE_INPUTS = {"lowres": ("pixels",)}          # stage -> graph inputs in image space
WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
FLOAT_ONLY_INPUTS = {"Resize": (2,)}             # inputs the ONNX spec types as float32
FP16_MAX = float(np.finfo(np.float16).max)
FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
# the inter-stage tensors an FP16 stage file takes / gives in FP16 (the module docstring)
FP16_BUFFERS = {"lowres": ("lowres_features", "kv_cache"),
                "highres": ("patches", "kv_cache", "highres_features")}


# ------------------------------------------------------------------------------------------
# the policy
# ------------------------------------------------------------------------------------------

def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of the graph (inputs, initializers, inferred values).

    Pass a model loaded with load_external_data=False when it is large: types need no data.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # onnx raises InferenceError / ValueError with long texts
        raise Ps3EdgeError(f"ONNX type inference failed: {str(e).splitlines()[0]}") from None
    g = inferred.graph
    types = {i.name: i.data_type for i in g.initializer}
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    return types


def decide(model: onnx.ModelProto, stage: str, types: dict[str, int] | None = None) -> list[str | None]:
    """Per node, in graph order: "fp16", "fp32", "any" (reads floats as they come: one float
    input and no float output, e.g. Shape) or None (does not touch floats)."""
    graph = model.graph
    types = tensor_types(model) if types is None else types
    const = {i.name for i in graph.initializer}
    from_image = set(IMAGE_INPUTS.get(stage, ()))
    after_weight: set[str] = set()
    nodes = list(graph.node)
    prec: list[str | None] = [None] * len(nodes)
    const_node = [False] * len(nodes)

    for i, node in enumerate(nodes):
        ins = [t for t in node.input if t]
        is_const = all(t in const for t in ins)
        weighted = node.op_type in WEIGHTED_OPS and len(ins) > 1 and ins[1] in const
        image = any(t in from_image for t in ins)
        past = weighted or any(t in after_weight for t in ins)
        for o in node.output:
            if is_const:
                const.add(o)
            if image and not past:
                from_image.add(o)
            if past:
                after_weight.add(o)
        float_in = [t for t in ins if types.get(t) == FLOAT]
        float_out = [t for t in node.output if types.get(t) == FLOAT]
        if not float_in and not float_out:
            continue
        if not float_out and len(float_in) <= 1:
            prec[i] = "any"
            continue
        if is_const:
            const_node[i] = True
            continue                       # decided by its consumers, below
        if stage in WHOLE_STAGE_FP32 or node.op_type in FP32_OP_TYPES or (image and not past):
            prec[i] = "fp32"
        else:
            prec[i] = "fp16"

    # constant sub-graphs (tap weights, the position table, scales): FP16 only when every
    # consumer computes in FP16
    consumers = defaultdict(list)
    for j, node in enumerate(nodes):
        for t in node.input:
            consumers[t].append(j)
    graph_outputs = {o.name for o in graph.output}
    for i in reversed(range(len(nodes))):
        if not const_node[i]:
            continue
        users = [prec[j] for o in nodes[i].output for j in consumers[o] if prec[j] not in ("any", None)]
        feeds_output = any(o in graph_outputs for o in nodes[i].output)
        prec[i] = "fp16" if users and all(u == "fp16" for u in users) and not feeds_output else "fp32"
    return prec


def fp32_layer_matcher(precision_map: dict) -> Callable[[str, list[str]], bool]:
    """For a TensorRT builder: is the layer (its name, its output tensor names) one to keep FP32?"""
    nodes = set(precision_map.get("fp32_nodes", ()))
    tensors = set(precision_map.get("fp32_tensors", ()))

    def match(layer_name: str, output_names=()) -> bool:
        return layer_name in nodes or any(t in tensors for t in output_names)
    return match


# ------------------------------------------------------------------------------------------
# the converter
# ------------------------------------------------------------------------------------------

def _to_fp16_tensor(t: TensorProto) -> TensorProto:
    arr = numpy_helper.to_array(t)
    out = numpy_helper.from_array(np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16), t.name)
    return out


def _convert_constant(node: onnx.NodeProto) -> None:
    for a in node.attribute:
        if a.name == "value" and a.t.data_type == FLOAT:
            a.t.CopyFrom(_to_fp16_tensor(a.t))
        elif a.name in ("value_float", "value_floats"):
            values = np.array([a.f] if a.name == "value_float" else list(a.floats), np.float32)
            if a.name == "value_float":
                values = values.reshape(())
            tensor = numpy_helper.from_array(np.clip(values, -FP16_MAX, FP16_MAX).astype(np.float16))
            node.attribute.remove(a)
            node.attribute.append(helper.make_attribute("value", tensor))
            return


def convert_fp16(model: onnx.ModelProto, stage: str, types: dict[str, int] | None = None,
                 fp16_io: tuple[str, ...] = ()) -> tuple[onnx.ModelProto, dict]:
    """Apply the FP16 policy to `model` (modified in place, weights loaded). Returns the model
    and its precision map. `types` may come from `tensor_types` of a data-less copy. `fp16_io`:
    the float graph inputs and outputs the file takes / gives in FP16 (`calibrate` passes
    FP16_BUFFERS[stage]); the others stay float32."""
    graph = model.graph
    if types is None:
        types = tensor_types(model)
    boundary = {v.name for v in list(graph.input) + list(graph.output) if types.get(v.name) == FLOAT}
    unknown = sorted(set(fp16_io) - boundary)
    if unknown:
        raise Ps3EdgeError(f"stage '{stage}' has no float input or output {unknown[0]!r} "
                           f"(its float ones: {', '.join(sorted(boundary))})")
    prec = decide(model, stage, types)
    nodes = list(graph.node)
    for i, node in enumerate(nodes):               # the map and the casts need node names
        if not node.name:
            node.name = f"ps3edge_unnamed_{i}"
    dtype = _convert_initializers(graph, nodes, prec)
    for inp in graph.input:                        # FP16 buffers in: the nodes cast them where they compute FP32
        if inp.name in fp16_io:
            inp.type.tensor_type.elem_type = FLOAT16
            dtype[inp.name] = FLOAT16
    out_nodes = _converted_nodes(nodes, prec, types, dtype)
    _set_float_outputs(graph, dtype, out_nodes, set(fp16_io))
    del graph.node[:]
    graph.node.extend(out_nodes)
    del graph.value_info[:]                        # stale float32 types; onnxruntime re-infers

    fp32_nodes = [n.name for n, p in zip(nodes, prec) if p == "fp32"]
    fp32_tensors = [o for n, p in zip(nodes, prec) if p == "fp32" for o in n.output if types.get(o) == FLOAT]
    io_dtypes = {v.name: "float16" if v.name in fp16_io else "float32"
                 for v in list(graph.input) + list(graph.output) if v.name in boundary}
    precision_map = fp16_precision_map(stage, fp32_nodes, fp32_tensors,
                                       fp16_count=sum(p == "fp16" for p in prec), io_dtypes=io_dtypes)
    return model, precision_map


def _convert_initializers(graph, nodes: list, prec: list) -> dict[str, int]:
    """Float initializers read only by FP16 nodes become FP16; returns tensor -> dtype so far
    (graph inputs and initializers)."""
    consumers = defaultdict(list)
    for i, node in enumerate(nodes):
        for t in node.input:
            consumers[t].append(prec[i])
    dtype: dict[str, int] = {i.name: FLOAT for i in graph.input if i.type.tensor_type.elem_type == FLOAT}
    for init in graph.initializer:
        if init.data_type != FLOAT:
            continue
        users = [p for p in consumers[init.name] if p in ("fp16", "fp32")]
        if users and all(p == "fp16" for p in users):
            init.CopyFrom(_to_fp16_tensor(init))
            dtype[init.name] = FLOAT16
        else:
            dtype[init.name] = FLOAT
    return dtype


def _converted_nodes(nodes: list, prec: list, types: dict[str, int], dtype: dict[str, int]) -> list:
    """The nodes in their precision, with a Cast in front of every input of the other float type
    (one Cast per tensor and type); `dtype` gains every node output."""
    casts: dict[tuple[str, int], str] = {}
    out_nodes: list[onnx.NodeProto] = []

    def cast(tensor: str, to: int) -> str:
        key = (tensor, to)
        if key not in casts:
            suffix = "fp16" if to == FLOAT16 else "fp32"
            name = f"{tensor}__{suffix}"
            out_nodes.append(helper.make_node("Cast", [tensor], [name], to=to, name=f"{tensor}__cast_{suffix}"))
            casts[key] = name
        return casts[key]

    for node, p in zip(nodes, prec):
        want = FLOAT16 if p == "fp16" else FLOAT
        if p in ("fp16", "fp32"):
            for k, t in enumerate(node.input):
                if t and t in dtype:
                    target = FLOAT if k in FLOAT_ONLY_INPUTS.get(node.op_type, ()) else want
                    if dtype[t] != target:
                        node.input[k] = cast(t, target)
            if p == "fp16":
                _fp16_attributes(node)
        for o in node.output:
            if types.get(o) == FLOAT:
                dtype[o] = want
        out_nodes.append(node)
    return out_nodes


def _fp16_attributes(node) -> None:
    """Constants, Cast targets and ConstantOfShape values of an FP16 node, made FP16."""
    if node.op_type == "Constant":
        _convert_constant(node)
    for a in node.attribute:
        if node.op_type == "Cast" and a.name == "to" and a.i == FLOAT:
            a.i = FLOAT16
        if node.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == FLOAT:
            a.t.CopyFrom(_to_fp16_tensor(a.t))


def _set_float_outputs(graph, dtype: dict[str, int], out_nodes: list, fp16_io: set[str]) -> None:
    """Float outputs in `fp16_io` are FP16, the others float32: where the value computed has the
    other type, it gets a cast to the output's own name."""
    for out in graph.output:
        if out.name not in dtype:
            continue
        want = FLOAT16 if out.name in fp16_io else FLOAT
        out.type.tensor_type.elem_type = want
        if dtype[out.name] == want:
            continue
        inner = f"{out.name}__{'fp32' if dtype[out.name] == FLOAT else 'fp16'}_value"
        for node in out_nodes:
            node.output[:] = [inner if t == out.name else t for t in node.output]
            node.input[:] = [inner if t == out.name else t for t in node.input]
        out_nodes.append(helper.make_node("Cast", [inner], [out.name], to=want, name=f"{out.name}__cast_output"))


def fp16_precision_map(stage: str, fp32_nodes=(), fp32_tensors=(), fp16_count: int = 0,
                       io_dtypes: dict[str, str] | None = None) -> dict:
    """The map of an FP16 stage; `io_dtypes` (float input / output -> dtype) None: all float32."""
    whole = stage in WHOLE_STAGE_FP32
    kinds = set((io_dtypes or {}).values()) or {"float32"}
    return {
        "schema": PRECISION_MAP_SCHEMA,
        "default": "fp32" if whole else "fp16",
        "io_dtype": kinds.pop() if len(kinds) == 1 else "mixed",
        **({"io_dtypes": dict(io_dtypes)} if io_dtypes else {}),
        "fp32_op_types": ["*"] if whole else list(FP32_OP_TYPES),
        "fp32_regions": (["whole stage"] if whole else
                         ["image-space"] if stage in IMAGE_INPUTS else []) + ["constants feeding fp32 nodes"],
        "fp32_nodes": list(fp32_nodes),
        "fp32_tensors": list(fp32_tensors),
        "fp16_node_count": fp16_count,
        "tensorrt": {"strongly_typed": False,
                     "builder_flags": [] if whole else ["FP16", "OBEY_PRECISION_CONSTRAINTS"]},
    }


def check_types(model: onnx.ModelProto) -> None:
    """Strict type inference over a converted graph: a mismatch is our bug, said in one line."""
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:  # onnx.shape_inference.InferenceError and friends
        raise Ps3EdgeError(f"the FP16 graph does not type-check: {str(e).splitlines()[0]}") from None


# ------------------------------------------------------------------------------------------
# the same policy on our torch stages (the torch backend's --precision fp16 / bf16)
# ------------------------------------------------------------------------------------------

TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def torch_stage_modules(model, layers, precision: str) -> dict:
    """lowres / selector / highres modules of `model` with the policy above: image-space resizes
    in fp32 (the high-res patches are the runtime's, cut from the fp32 pixels), the selector in fp32, the rest in fp16 (or bf16). Torch's half
    LayerNorm and softmax kernels accumulate their statistics in fp32, which is the policy's
    'LayerNorm and Softmax in fp32'. Inputs and outputs stay float32."""
    import copy

    import torch

    from ..model.ps3 import bicubic_resize
    from ..model.stages import HighResStage, SelectorStage, normalize_layers

    if precision not in TORCH_DTYPES:
        raise Ps3EdgeError(f"the torch backend runs fp32, {', '.join(TORCH_DTYPES)}; got '{precision}'")
    dtype = getattr(torch, TORCH_DTYPES[precision])
    reduced = copy.deepcopy(model).to(dtype).eval()
    layers = normalize_layers(layers, model.cfg.depth)

    class LowRes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = reduced

        def forward(self, pixels):
            pixels = pixels.float()
            resize = lambda image, size: bicubic_resize(image, size).to(dtype)    # fp32 resize, then cast
            low, kv, sel, conv = self.model.lowres(pixels, layers, resize=resize)
            return low.float(), kv.float(), sel.float(), conv.float()

    class HighRes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stage = HighResStage(reduced, layers)
            with torch.no_grad():
                self.stage.position_table = model.highres_position_table().to(dtype)   # from fp32 weights

        def forward(self, patches, positions, step_image, kv_cache):
            return self.stage(patches.to(dtype), positions, step_image, kv_cache.to(dtype)).float()

    return {"lowres": LowRes(), "selector": SelectorStage(model), "highres": HighRes()}
