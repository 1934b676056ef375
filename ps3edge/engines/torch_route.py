"""The Torch-TensorRT route of `ps3edge build` (`--via torch-tensorrt`): our PyTorch stage
modules (model/stages.py), exported with torch.export at the plan's profile and compiled by
Torch-TensorRT's dynamo converter into a serialized engine with the same profiles and manifest
entry as the ONNX route.

Its fp32 is strongly typed; its fp16 is weakly typed (`enabled_precisions`: TensorRT may run any
layer of the stage in fp16, where the ONNX route holds LayerNorm and softmax in fp32), so it
needs TensorRT 10 and a Torch-TensorRT whose converter still takes `enabled_precisions`
(before 2.14). The converter drops keywords it does not know without a word, so each keyword is
chosen from its signature, and one it lacks is refused.
"""

from __future__ import annotations

import inspect
import shutil
import tempfile
from pathlib import Path

from ..artifact.manifest import Manifest, StageEntry
from ..errors import Ps3EdgeError
from .plan import BuildOptions, StagePlan, workspace_bytes

_TORCH_DTYPES = {"float32": "float32", "int32": "int32"}


def export_stage_program(module, stage: StageEntry, profile: dict, num_positions: int, device: str = "cpu"):
    """torch.export of a stage module with the profile's dynamic axes (B, T, N) as export Dims and
    example inputs at the profile's opt shapes: what Torch-TensorRT compiles."""
    import torch

    examples, dynamic, dims = [], {}, {}
    for t in stage.inputs:
        b = profile[t.name]
        dtype = getattr(torch, _TORCH_DTYPES[t.dtype])
        if t.name == "positions":
            examples.append(torch.randint(0, num_positions, tuple(b["opt"]), dtype=dtype, device=device))
        elif t.name == "step_image":                      # rows name images of the kv_cache's batch axis
            images = profile["kv_cache"]["opt"][2]
            examples.append(torch.arange(b["opt"][0], dtype=dtype, device=device) % images)
        else:
            examples.append(torch.randn(tuple(b["opt"]), dtype=dtype, device=device))
        axes = {}
        for axis, d in enumerate(t.shape):
            if isinstance(d, str) and b["min"][axis] != b["max"][axis]:
                dims.setdefault(d, torch.export.Dim(d, min=b["min"][axis], max=b["max"][axis]))
                axes[axis] = dims[d]
        dynamic[t.name] = axes or None
    with torch.no_grad():
        return torch.export.export(module, tuple(examples), dynamic_shapes=dynamic if dims else None)


def _torch_tensorrt_converter(tt, precision: str):
    """Torch-TensorRT's ExportedProgram -> engine converter and its parameters; refuses fp16
    where the converter takes no enabled_precisions (2.14 on: it builds in the program's dtypes)."""
    convert = tt.dynamo.convert_exported_program_to_serialized_trt_engine
    params = inspect.signature(convert).parameters
    if precision == "fp16" and "enabled_precisions" not in params:
        raise Ps3EdgeError(f"Torch-TensorRT {tt.__version__} builds engines in the exported program's own dtypes "
                           "(its converter takes no enabled_precisions); build fp16 with --via onnx")
    return convert, params


def torch_tensorrt_typing(params, precision: str, input_names: list[str], output_names: list[str]) -> dict:
    """The converter's typing and naming keywords, chosen from its parameters: the converter
    takes no autocast (only dynamo.compile does) and drops keywords it does not know into
    **kwargs without a word. fp16: weak typing with fp16 allowed (2.10 on default to explicit
    typing, which would build the fp32 program as fp32); fp32: explicit typing."""
    import torch

    kwargs = {}
    if "enabled_precisions" in params:
        kwargs["enabled_precisions"] = {torch.float32, torch.float16} if precision == "fp16" else {torch.float32}
    if "use_explicit_typing" in params:
        kwargs["use_explicit_typing"] = precision != "fp16"
    if "arg_input_binding_names" in params:                # name the engine's tensors as the manifest does
        # the names mirror the exported program's argument spec, a tuple
        kwargs["arg_input_binding_names"] = tuple(input_names)
        kwargs["output_binding_names"] = tuple(output_names) if len(output_names) > 1 else output_names[0]
    return kwargs


def _stage_module(manifest: Manifest, stage: str, models: dict):
    """Our torch module of the stage on the GPU; `models` keeps the rebuilt PS3 between stages."""
    from ..artifact.weights import rebuild_torch_model
    from ..model import HighResStage, LowResStage, SelectorStage

    if "model" not in models:
        models["model"] = rebuild_torch_model(manifest).eval().cuda()
    model = models["model"]
    layers = list(manifest.returned_layers)
    return {"lowres": lambda: LowResStage(model, layers, for_export=True),
            "selector": lambda: SelectorStage(model),
            "highres": lambda: HighResStage(model, layers)}[stage]().eval().cuda()


def _converter_inputs(tt, stage: StageEntry, profile: dict) -> list:
    """Torch-TensorRT Inputs: static where the profile's min is its max, else min / opt / max."""
    import torch

    inputs = []
    for t in stage.inputs:
        b, dtype = profile[t.name], getattr(torch, _TORCH_DTYPES[t.dtype])
        if b["min"] == b["max"]:
            inputs.append(tt.Input(shape=tuple(b["max"]), dtype=dtype))
        else:
            inputs.append(tt.Input(min_shape=tuple(b["min"]), opt_shape=tuple(b["opt"]),
                                   max_shape=tuple(b["max"]), dtype=dtype))
    return inputs


def _convert(tt, convert, params, program, kwargs: dict, stage: str):
    """Run the converter; one line where it fails or lacks one of our keywords."""
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise Ps3EdgeError(f"Torch-TensorRT {tt.__version__}'s converter does not take {unknown}; "
                           "build with --via onnx")
    try:
        try:
            return convert(program, **kwargs)
        except Exception as e:
            if "BindingName" not in type(e).__name__:
                raise
            # names the exported program's structure does not take: inspect_engine maps by position
            kwargs.pop("arg_input_binding_names")
            kwargs.pop("output_binding_names")
            return convert(program, **kwargs)
    except Exception as e:  # Torch-TensorRT raises many types; the first line says what failed
        raise Ps3EdgeError(f"Torch-TensorRT could not compile stage '{stage}': "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _build_with_torch_tensorrt(tt, trt, artifact_dir: Path, manifest: Manifest, plan: StagePlan,
                               options: BuildOptions, timing: bytes, models: dict):
    """Compile our PyTorch stage module with Torch-TensorRT (dynamo) into a serialized engine:
    (engine bytes, timing cache bytes, 0 layers held by a precision map)."""
    module = _stage_module(manifest, plan.stage, models)
    stage = manifest.stages[plan.stage]
    program = export_stage_program(module, stage, plan.profile, manifest.geometry.highres_patches_total, "cuda")
    convert, params = _torch_tensorrt_converter(tt, plan.precision)
    kwargs = {"arg_inputs": _converter_inputs(tt, stage, plan.profile),
              "workspace_size": workspace_bytes(options.workspace_gb),
              "optimization_level": options.optimization_level, "require_full_compilation": True,
              "min_block_size": 1, "disable_tf32": plan.precision == "fp32"}
    kwargs.update(torch_tensorrt_typing(params, plan.precision, stage.input_names, stage.output_names))
    # the converter reads and writes the timing cache by path
    scratch = Path(tempfile.mkdtemp(prefix=".ps3edge-timing-", dir=artifact_dir))
    try:
        timing_path = scratch / "timing.cache"
        if timing:
            timing_path.write_bytes(timing)
        kwargs["timing_cache_path"] = str(timing_path)
        engine = _convert(tt, convert, params, program, kwargs, plan.stage)
        timing = timing_path.read_bytes() if timing_path.is_file() else timing
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return bytes(engine), timing, 0
